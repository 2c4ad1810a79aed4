"""I/O layer: GDAL rasters, HDF5 mask stores, GeoTIFF/COG/vector export, galleries on disk."""

# Scenes whose files one process keeps open at once (GDAL readers, HDF5 datasets): tiles arrive
# grouped by scene, so a few suffice; the bound keeps memory and file descriptors independent of
# the archive's size (a 10,000-scene job would otherwise hold 10,000 handles and run out of
# descriptors).
OPEN_SCENES = 8
