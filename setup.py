"""resflow-mpi: MPI-parallel deep-learning mapping of pixel labels over satellite scene archives."""
from setuptools import find_packages, setup

setup(
    name="resflow-mpi",
    version="0.1.0",
    description="RESFlow reimplemented on MPI: tile, hash, bucket and segment huge GeoTIFF archives",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["resflow_mpi", "resflow_mpi.*"]),
    package_data={"resflow_mpi": ["py.typed"]},
    # mpi4py, h5py (parallel build) and GDAL come from the system stack (launch/install.sh); they
    # are not listed here so pip never builds them against a different MPI/HDF5 than the system's.
    install_requires=["numpy>=1.24,<2", "pyyaml>=6", "scikit-learn>=1.3", "torch>=2.1"],
    extras_require={"spark": ["pyspark>=3.5"], "plots": ["matplotlib>=3.7"], "test": ["pytest>=8"]},
    entry_points={"console_scripts": ["resflow=resflow_mpi.cli:main"]},
)
