import sys

from rcnn_lab.runner.launch import die_with_launcher

die_with_launcher()  # a rank of `run --nproc`: ends with its launcher; first, before torch is imported

from rcnn_lab.cli.main import main  # noqa: E402

sys.exit(main())
