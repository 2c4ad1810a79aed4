"""I/O layer: GDAL rasters, HDF5 mask stores, GeoTIFF/COG/vector export, galleries on disk."""
