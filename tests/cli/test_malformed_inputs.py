"""A corpus of malformed and hostile experiment inputs, each run through ``validate`` and ``run --dry-run``.

Every case must end the same way: exit 2, exactly one short error line on stderr naming where the
problem is, no traceback, nothing on stdout, no file written, and (these are guards against
resource exhaustion, not speed goals) well under a few seconds and a few tens of MB.
"""

from __future__ import annotations

import contextlib
import io
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rcnn_lab.cli.main import main

TIME_CAP_S = 10.0  # a billion-laughs or a 50 MB file took minutes before the limits
MEMORY_CAP_MB = 64  # ... and gigabytes
LINE_CAP = 400  # an error quotes an excerpt of the value, never all of it

OK = "name: t\nmodel: {num_classes: 6}\n"


def _saved(state: dict, legacy: bool = False) -> bytes:
    """``torch.save`` of ``state`` (lists as tensors), as a file's bytes; ``legacy``: torch's older format, which
    cannot be memory-mapped."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.tensor(v) for k, v in state.items()}, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs" document: ``levels`` anchors, each a list of ``width`` aliases of the previous."""
    lines = ['  l0: &l0 "lol"']
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "x_anchors:\n" + "\n".join(lines) + "\n"


def _flow_bomb(levels: int, width: int = 9) -> str:
    """The same bomb as one flow value (for ``--set``)."""
    parts = ["&l0 lol"]
    for i in range(1, levels + 1):
        parts.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]  # exp.yaml is the experiment
    args: list[str] = field(default_factory=list)
    expect: tuple[str, ...] = ()  # substrings of the error line
    exp: str = "exp.yaml"
    links: dict[str, str] = field(default_factory=dict)  # symbolic link -> its target
    run_only: bool = False  # flags of `run` (validate has none of them) or the store (validate does not open it)
    code: int = 2  # 3 for a store


def _diamond(n: int) -> dict[str, str]:
    """``n`` files, each naming the next twice as its base: 2**n reads without a limit."""
    files = {f"d{i}.yaml": f"base: [d{i + 1}.yaml, d{i + 1}.yaml]\n" for i in range(n - 1)}
    files[f"d{n - 1}.yaml"] = OK
    files["exp.yaml"] = "base: d0.yaml\n"
    return files


SEEDS_FILE = "exp.yaml: seeds"
ROUND_2 = [  # issue 25: the config / flags / stores half
    # wrong results
    Case("seed-set-with-seeds", {"exp.yaml": OK + "seeds: [0, 1]\n"}, ["--set", "train.seed=7"],
         expect=("--set: train.seed", "seeds: [0, 1]", "--seeds")),
    Case("seed-in-grid", {"exp.yaml": OK + "grid: {train.seed: [0, 1, 2]}\n"}, expect=("grid.train.seed", "seeds:")),
    Case("seed-in-variant", {"exp.yaml": OK + "variants:\n  a: {train.seed: 3}\n"}, expect=("variants.a.train.seed",)),
    Case("section-null-set", {"exp.yaml": OK}, ["--set", "model.roi_heads=null"],
         expect=("--set: model.roi_heads", "whole section", "model.roi_heads.KEY=VALUE")),
    Case("section-null-variant", {"exp.yaml": OK + "variants:\n  v: {model.rpn: null}\n"}, expect=("exp.yaml: model.rpn",)),
    Case("section-null-over-base", {"b.yaml": "name: t\nmodel: {num_classes: 6, rpn: {nms_thresh: 0.6}}\n",
                                    "exp.yaml": "base: b.yaml\nmodel: {rpn: }\n"},
         expect=("exp.yaml: model.rpn", "base file")),
    Case("grid-key-in-variant", {"exp.yaml": OK + "variants:\n  v: {train.clip_grad_norm: 1.0}\n"
                                             "grid: {train.clip_grad_norm: [2.0, 3.0]}\n"},
         expect=("variants.v.train.clip_grad_norm", "grid")),
    Case("grid-prefix-of-variant-key", {"exp.yaml": OK + "variants:\n  v: {model.rpn.nms_thresh: 0.6}\n"
                                                    "grid: {model.rpn: [{nms_thresh: 0.5}]}\n"}, expect=("variants.v",)),
    Case("grid-over-tracking", {"exp.yaml": OK + "grid: {tracking.log_every: [1, 2]}\n"}, expect=("grid.tracking.log_every",)),
    Case("variant-tracking", {"exp.yaml": OK + "variants:\n  v: {tracking.experiment: other}\n"},
         expect=("variants.v.tracking.experiment",)),
    Case("image-std-zero", {"exp.yaml": "name: t\nmodel: {num_classes: 6, transform: {image_std: [0, 0, 0]}}\n"},
         expect=("model.transform.image_std", "> 0")),
    Case("image-std-negative-set", {"exp.yaml": OK}, ["--set", "model.transform.image_std=[0.2, -0.1, 0.2]"],
         expect=("--set: model.transform.image_std",)),
    # tracebacks
    Case("symlink-loop", {}, links={"exp.yaml": "loop.yaml", "loop.yaml": "exp.yaml"}, expect=("exp.yaml", "loops")),
    Case("base-symlink-loop", {"exp.yaml": "base: b.yaml\n" + OK}, links={"b.yaml": "b.yaml"}, expect=("exp.yaml: base", "'b.yaml'", "loops")),
    Case("seed-5000-digits", {"exp.yaml": OK + "seeds: [" + "9" * 5000 + "]\n"}, expect=("exp.yaml", "out of range")),
    Case("id-5000-digits", {"exp.yaml": OK + "train: {seed: " + "7" * 5000 + "}\n"}, expect=("exp.yaml", "out of range")),
    Case("seed-2-64", {"exp.yaml": OK + f"seeds: [{2**64}]\n"}, expect=(SEEDS_FILE, "64-bit")),
    Case("train-seed-2-64", {"exp.yaml": OK + f"train: {{seed: {2**64}}}\n"}, expect=("train.seed", "64-bit")),
    # caught too late: bounds at load
    Case("seeds-2000", {"exp.yaml": OK + f"seeds: {list(range(2000))}\n"}, expect=(SEEDS_FILE, "limit is 1,000")),
    Case("seeds-100k", {"exp.yaml": OK + f"seeds: {list(range(100_000))}\n"}, expect=("exp.yaml", "holds more than")),
    Case("batch-size-huge", {"exp.yaml": OK + "data: {batch_size: 1000000}\n"}, expect=("data.batch_size", "limit")),
    Case("min-size-huge", {"exp.yaml": OK}, ["--set", "model.transform.min_size=100000"],
         expect=("--set: model.transform.min_size", "8,192")),
    Case("num-images-huge", {"exp.yaml": OK + "data: {train: {type: shapes, num_images: 1000000000000}}\n"},
         expect=("data.train.num_images", "10,000,000")),
    # unclear --set keys
    Case("set-leading-dot", {"exp.yaml": OK}, ["--set", ".a=1"], expect=("--set", "'.a'", "empty part")),
    Case("set-only-dot", {"exp.yaml": OK}, ["--set", ".=1"], expect=("--set", "empty part")),
    Case("set-double-dot", {"exp.yaml": OK}, ["--set", "train..amp=bf16"], expect=("--set", "'train..amp'", "empty part")),
    Case("set-base", {"exp.yaml": OK}, ["--set", "base=other.yaml"], expect=("--set: base", "experiment file")),
    Case("set-seeds", {"exp.yaml": OK}, ["--set", "seeds=[1, 2]"], expect=("--set: seeds", "--seeds")),
    Case("set-long-key", {"exp.yaml": OK}, ["--set", "k" * 500 + "=1"], expect=("--set: kkk", "unknown key")),
    Case("set-longer-key", {"exp.yaml": OK}, ["--set", "k" * 5000 + "=1"], expect=("--set", "characters long")),
    # run's flags: --dry-run refuses what the run refuses
    Case("parallel-negative", {"exp.yaml": OK}, ["--parallel", "-1"], expect=("--parallel", ">= 1"), run_only=True),
    Case("nproc-negative", {"exp.yaml": OK}, ["--nproc", "-1"], expect=("--nproc", ">= 1"), run_only=True),
    Case("parallel-with-shard", {"exp.yaml": OK}, ["--parallel", "2", "--shard", "0/2"], expect=("--parallel", "--shard"),
         run_only=True),
    Case("seeds-flag-2-64", {"exp.yaml": OK}, ["--seeds", f"0,{2**64}"], expect=("--seeds", "64-bit"), run_only=True),
    Case("seeds-flag-5000-digits", {"exp.yaml": OK}, ["--seeds", "9" * 5000], expect=("--seeds", "64-bit"), run_only=True),
    Case("seeds-flag-100k", {"exp.yaml": OK}, ["--seeds", ",".join(map(str, range(100_000)))],
         expect=("--seeds", "limit is 1,000"), run_only=True),
    Case("seeds-flag-superscript", {"exp.yaml": OK}, ["--seeds", "1,²"], expect=("--seeds", "integers"), run_only=True),
    # stores: exit 3, what is wrong with the URI
    *[Case(f"store-{name}", {"exp.yaml": OK + f"tracking: {{uri: '{uri}'}}\n"}, expect=("tracking store", *expect),
           run_only=True, code=3)
      for name, uri, expect in [
          ("ftp", "ftp://example.org/runs", ("scheme 'ftp'",)),
          ("unknown-scheme", "s3x://bucket/runs", ("scheme 's3x'",)),
          ("sqlite-memory", "sqlite:///:memory:", ("in-memory",)),
          ("sqlite-empty", "sqlite://", ("in-memory",)),
          ("sqlite-one-slash", "sqlite:/runs/m.db", ("sqlite", "not a URL")),
          ("no-host", "http://", ("no host",)),
          ("bad-port", "http://localhost:99999", ("malformed URL",)),
          ("port-not-a-number", "http://localhost:5x", ("malformed URL",)),
          ("plain-file", "exp.yaml", ("is a file",)),
          ("sqlite-not-a-database", "sqlite:///exp.yaml", ("not a SQLite database",)),
          ("sqlite-folder", "sqlite:///.", ("folder",)),
      ]],
]

CASES = [
    # 1. tracebacks turned into one line
    Case("list-as-mapping-key", {"exp.yaml": OK + "? [a, b]: 1\n"}, expect=("exp.yaml", "line 3", "mapping key")),
    Case("type-is-a-list", {"exp.yaml": OK + "data: {train: {type: [shapes]}}\n"}, expect=("data.train.type",)),
    Case("type-is-a-mapping", {"exp.yaml": "name: t\nmodel: {backbone: {type: {a: 1}}}\n"},
         expect=("model.backbone.type", "backbone name")),
    Case("not-utf8", {"exp.yaml": b"name: t\nmodel: {num_classes: 6}\n# \xff\xfe\n"}, expect=("exp.yaml", "UTF-8", "line 3")),
    Case("base-not-utf8", {"exp.yaml": "base: b.yaml\nname: t\n", "b.yaml": b"\x89PNG\r\n\x1a\n\x00\x00"},
         expect=("b.yaml", "UTF-8")),
    Case("binary-nul", {"exp.yaml": b"name: t\x00\x01\x02\n"}, expect=("exp.yaml",)),
    Case("deep-flow-nesting", {"exp.yaml": "name: t\nx: " + "[" * 5000 + "]" * 5000 + "\n"}, expect=("nests deeper",)),
    Case("deep-block-nesting", {"exp.yaml": "name: t\n" + "".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "v: 1\n"},
         expect=("nests deeper",)),
    Case("deep-set", {"exp.yaml": OK}, ["--set", "model.rpn=" + "[" * 3000 + "]" * 3000], expect=("--set", "nests deeper")),
    Case("deep-set-key", {"exp.yaml": OK}, ["--set", ".".join(["a"] * 500) + "=1"], expect=("--set", "parts")),
    # 2. resource exhaustion
    Case("alias-bomb-scalar", {"exp.yaml": OK + _bomb(9) + "train: {amp: *l9}\n"}, expect=("exp.yaml", "aliases")),
    Case("alias-bomb-spec", {"exp.yaml": "name: t\n" + _bomb(9) + "model: {backbone: *l9}\n"}, expect=("aliases",)),
    Case("alias-bomb-set", {"exp.yaml": OK}, ["--set", f"train.amp={_flow_bomb(9)}"], expect=("--set", "train.amp", "aliases")),
    Case("small-bomb-quoted", {"exp.yaml": OK + f"train: {{amp: {_flow_bomb(4)}}}\n"}, expect=("train.amp",)),
    Case("small-bomb-as-name", {"exp.yaml": f"name: {_flow_bomb(4)}\n"}, expect=("name", "expected str")),
    Case("long-string", {"exp.yaml": OK + "train: {amp: " + "x" * 200_000 + "}\n"}, expect=("train.amp", "...")),
    Case("long-key", {"exp.yaml": OK + "k" * 1000 + ": 1\n"}, expect=("unknown key",)),
    Case("too-long-key", {"exp.yaml": OK + "k" * 100_000 + ": 1\n"}, expect=("invalid YAML",)),
    Case("huge-file", {"exp.yaml": OK + "# " + "x" * (2 << 20) + "\n"}, expect=("exp.yaml", "limited to")),
    Case("base-diamond", _diamond(12), expect=("base", "more than 64 files")),
    Case("grid-explosion", {"exp.yaml": OK + "grid:\n" + "".join(f"  train.k{i}: [1, 2, 3, 4]\n" for i in range(12))},
         expect=("grid", "variants")),
    # 3. accepted but wrong
    Case("max-images-zero", {"exp.yaml": OK + "eval: {max_images: 0}\n"}, expect=("eval.max_images",)),
    Case("max-images-negative", {"exp.yaml": OK + "eval: {max_images: -5}\n"}, expect=("eval.max_images",)),
    Case("outage-buffer-zero", {"exp.yaml": OK + "tracking: {outage_buffer_mb: 0}\n"},
         expect=("tracking.outage_buffer_mb", "must be positive")),
    Case("lr-negative", {"exp.yaml": OK + "train: {optimizer: {type: sgd, lr: -0.1}}\n"}, expect=("train.optimizer.lr", "> 0")),
    Case("lr-nan", {"exp.yaml": OK}, ["--set", "train.optimizer.lr=.nan"], expect=("--set", "train.optimizer.lr", "finite")),
    Case("lr-inf-adamw", {"exp.yaml": OK + "train: {optimizer: {type: adamw, lr: .inf}}\n"}, expect=("finite",)),
    Case("clip-nan", {"exp.yaml": OK + "train: {clip_grad_norm: .nan}\n"}, expect=("train.clip_grad_norm", "finite")),
    Case("size-divisible-zero", {"exp.yaml": OK}, ["--set", "model.transform.size_divisible=0"],
         expect=("--set", "model.transform.size_divisible", "must be positive")),
    Case("size-divisible-huge", {"exp.yaml": "name: t\nmodel: {num_classes: 6, transform: {size_divisible: 1000000000}}\n"},
         expect=("exp.yaml", "model.transform.size_divisible", "the limit is 8,192")),
    Case("blocks-wrong-length", {"exp.yaml": OK}, ["--set", "model.backbone.blocks=[1, 1]"],
         expect=("--set", "model.backbone.blocks", "4 block counts")),
    Case("blocks-huge", {"exp.yaml": "name: t\nmodel: {num_classes: 6, backbone: {type: resnet_fpn, blocks: [1, 1000000, 1, 1]}}\n"},
         expect=("exp.yaml", "model.backbone.blocks", "in 1..64")),
    # weights that do not fit the backbone: found by the load-time check on the meta device, before any download
    Case("blocks-with-imagenet-weights", {"exp.yaml": OK},
         ["--set", "model.backbone.blocks=[1, 1, 1, 1]", "--set", "model.backbone.weights=imagenet"],
         expect=("--set", "model.backbone.blocks", "does not fit resnet50's weights", "drop blocks")),
    Case("weights-file-of-another-network", {"exp.yaml": OK, "body.pth": _saved({"conv1.weight": [[0.0]]})},
         ["--set", "model.backbone.weights=body.pth"],
         expect=("--set", "model.backbone.weights", "body.pth: does not fit resnet50", "missing")),
    Case("detector-weights-of-another-network", {"exp.yaml": OK, "det.pth": _saved({"conv1.weight": [[0.0]]})},
         ["--set", "model.weights=det.pth"], expect=("--set", "model.weights", "det.pth does not fit this model", "0 of")),
    Case("detector-weights-missing", {"exp.yaml": OK}, ["--set", "model.weights=nothere.pth"],
         expect=("--set", "model.weights", "weights file 'nothere.pth' not found")),
    Case("weights-file-of-another-network-old-format", {"exp.yaml": OK, "body.pth": _saved({"conv1.weight": [[0.0]]}, legacy=True)},
         ["--set", "model.backbone.weights=body.pth"],
         expect=("--set", "model.backbone.weights", "body.pth: does not fit resnet50", "missing")),
    Case("float-overflow", {"exp.yaml": OK + "train: {clip_grad_norm: " + "9" * 400 + "}\n"}, expect=("finite",)),
    Case("variant-list-index", {"b.yaml": OK + "data: {transforms: [{type: hflip, p: 0.5}]}\n",
                                "exp.yaml": "base: b.yaml\nvariants:\n  v: {'data.transforms[0].p': 2}\n"},
         expect=("exp.yaml: data.transforms[0].p", "whole list")),
    # 4. names that would leave the runs folder
    Case("name-parent", {"exp.yaml": "name: ../../x\n"}, expect=("name", "plain name")),
    Case("name-absolute", {"exp.yaml": "name: /tmp/elsewhere\n"}, expect=("name", "plain name")),
    Case("name-set", {"exp.yaml": OK}, ["--set", "name=../up"], expect=("--set: name",)),
    Case("tracking-experiment-parent", {"exp.yaml": OK + "tracking: {experiment: ../../x}\n"}, expect=("tracking.experiment",)),
    # the rest of the corpus: inputs that already failed cleanly, kept so they stay that way
    Case("syntax", {"exp.yaml": "name: t\nmodel: {num_classes: 6\n"}, expect=("invalid YAML",)),
    Case("top-level-list", {"exp.yaml": "- 1\n- 2\n"}, expect=("top level",)),
    Case("empty", {"exp.yaml": ""}, expect=("name", "required")),
    Case("duplicate-key", {"exp.yaml": OK + "name: u\n"}, expect=("duplicate key",)),
    Case("python-tag", {"exp.yaml": OK + "x: !!python/object/apply:os.system ['true']\n"}, expect=("invalid YAML",)),
    Case("undefined-alias", {"exp.yaml": OK + "train: {amp: *nope}\n"}, expect=("invalid YAML",)),
    Case("train-not-mapping", {"exp.yaml": OK + "train: 5\n"}, expect=("train",)),
    Case("seeds-floats", {"exp.yaml": OK + "seeds: [1.5]\n"}, expect=("seeds",)),
    Case("variants-list", {"exp.yaml": OK + "variants: [a, b]\n"}, expect=("variants",)),
    Case("variant-key-int", {"exp.yaml": OK + "variants:\n  v: {1: 2}\n"}, expect=("dotted.key",)),
    Case("grid-key-int", {"exp.yaml": OK + "grid: {1: [2]}\n"}, expect=("grid",)),
    Case("plugins-scalar", {"exp.yaml": OK + "plugins: 5\n"}, expect=("plugins",)),
    Case("base-missing", {"exp.yaml": "base: nope.yaml\n" + OK}, expect=("base", "not found")),
    Case("base-is-folder", {"exp.yaml": "base: sub\n" + OK, "sub/x.yaml": OK}, expect=("base",)),
    Case("base-cycle", {"exp.yaml": "base: b.yaml\n" + OK, "b.yaml": "base: exp.yaml\n"}, expect=("cycle",)),
    Case("experiment-missing", {}, expect=("not found",), exp="missing.yaml"),
    Case("experiment-is-folder", {"sub/x.yaml": OK}, expect=("not found",), exp="sub"),
    Case("set-without-equals", {"exp.yaml": OK}, ["--set", "train.amp"], expect=("dotted.key=value",)),
    Case("num-classes-huge", {"exp.yaml": "name: t\nmodel: {num_classes: " + "9" * 30 + "}\n"}, expect=("num_classes",)),
    Case("unknown-component", {"exp.yaml": "name: t\nmodel: {backbone: {type: resnet_fnp}}\n"}, expect=("resnet_fpn",)),
    *ROUND_2,
]


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


def _invoke(argv: list[str]) -> tuple[int, str, str, float, float]:
    out, err = io.StringIO(), io.StringIO()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return code, out.getvalue(), err.getvalue(), elapsed, peak


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Import the commands once, so the time cap measures the input's handling, not first imports."""
    from rcnn_lab.cli.main import build_parser
    from rcnn_lab.components import register_builtins

    build_parser()
    register_builtins()


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]], ids=["validate", "run-dry-run"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_fails_in_one_line_and_writes_nothing(case, command, tmp_path, monkeypatch):
    if case.run_only and command[0] != "run":
        pytest.skip("a flag or store of `run` only")
    folder = tmp_path / "work"
    folder.mkdir()
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    for name, target in case.links.items():
        (folder / name).symlink_to(target)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RCNN_LAB_RUNS", raising=False)
    before = _snapshot(folder)

    code, out, err, elapsed, peak_mb = _invoke([command[0], case.exp, *command[1:], *case.args])

    lines = err.splitlines()
    assert code == case.code, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"rcnn-lab {command[0]}: error: "), err[:2000]
    assert "Traceback" not in err and out == ""
    assert len(lines[0]) <= LINE_CAP, f"{len(lines[0])} characters: {lines[0][:300]}"
    for text in case.expect:
        assert text in lines[0], lines[0]
    assert _snapshot(folder) == before  # no store, no outputs, no file touched
    assert elapsed < TIME_CAP_S and peak_mb < MEMORY_CAP_MB, (elapsed, peak_mb)
