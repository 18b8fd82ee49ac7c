import sys

from rcnn_lab.runner.lifeline import die_with_launcher

die_with_launcher()  # a --nproc rank or --parallel worker: ends with its launcher; first, before torch is imported

from rcnn_lab.cli.main import main  # noqa: E402

sys.exit(main())
