import sys

from rcnn_lab.cli.main import main

sys.exit(main())
