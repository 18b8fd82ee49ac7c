"""Size limits of the synthetic ``shapes`` data (the dataset and ``rcnn-lab export-shapes``), stated in
docs/configuration.md ("Limits"). No imports: the CLI reads them to parse its flags without torch."""

MAX_IMAGES = 10_000_000  # shapes: num_images (10^12 would make every per-image list exhaust memory)
MAX_IMAGE_SIZE = 4096  # shapes: image_size, the side in pixels (one 4096^2 image is ~200 MB while drawn)
