"""The ``rcnn-lab`` command line."""
