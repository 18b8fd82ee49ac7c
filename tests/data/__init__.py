"""Tests of rcnn_lab.data (a package so basenames like test_loader.py may repeat across test folders)."""
