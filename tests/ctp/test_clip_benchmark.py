"""CLIP_benchmark itself (``clip_benchmark eval``, 1.6.2 from PyPI) on a ctp eval set and a ctp
checkpoint gives the numbers ``ctp.evaluate`` gives.

CLIP_benchmark runs in its own virtualenv, cached under ``~/.cache/ctp/`` (first run: installs
from PyPI, about 50 MB; later runs reuse it). The venv sees this interpreter's site-packages
through a ``.pth`` file (torch, open_clip, webdataset...), and gets only what is missing there,
each with ``--no-deps``, so the project's pins are never touched: clip_benchmark, scikit-learn
and its small deps. ``pycocoevalcap`` (captioning metrics, imported at start-up, unused here;
100 MB of Java jars) is replaced by a stub that fails when called. With NumPy >= 2.4 here, the
venv also gets numpy 2.3 (clip_benchmark 1.6.2's ``accuracy`` fails on 2.4).

Both sides run fp32 on CPU (``--no_amp``: CLIP_benchmark's default autocast would run bf16 on
CPU). The model is ctp's smallest preset, trained a few epochs: its embeddings have no ties, so
ranking metrics agree exactly. With ties they may not: CLIP_benchmark ranks with ``topk``
(index order among equals), ctp counts a tie against the query (``ctp/evaluate.py``). The set
has 8 classes: with fewer than 5 CLIP_benchmark reports ``acc5`` as NaN where ctp gives top-C.
"""

import fcntl
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from ctp.checkpoint import load_checkpoint, save_checkpoint
from ctp.data import load_classification_set, load_retrieval_set, read_chunk
from ctp.evaluate import evaluate_classification, evaluate_retrieval
from ctp.images import decode_image
from ctp.models import create_model
from ctp.strategies import get_strategy
from ctp.synthetic import SyntheticConfig, make_stream
from ctp.train import train_on_chunk

pytestmark = pytest.mark.slow

MODEL = "ctp-vit-micro-32"
# (module to look for, pip requirement): installed only when the module is not importable here
REQUIREMENTS = [
    ("clip_benchmark", "clip_benchmark==1.6.2"),
    ("sklearn", "scikit-learn==1.9.1"),
    ("scipy", "scipy==1.17.1"),
    ("joblib", "joblib==1.5.2"),
    ("threadpoolctl", "threadpoolctl==3.6.0"),
    ("narwhals", "narwhals==2.29.0"),
]
PYCOCOEVALCAP_STUB = {  # module -> class names captioning.py imports at start-up
    "tokenizer/ptbtokenizer": "PTBTokenizer",
    "bleu/bleu": "Bleu",
    "meteor/meteor": "Meteor",
    "rouge/rouge": "Rouge",
    "cider/cider": "Cider",
    "spice/spice": "Spice",
}


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def clip_benchmark_venv() -> Path:
    """The cached venv with ``bin/clip_benchmark``; built on first use (needs PyPI)."""
    missing = [req for mod, req in REQUIREMENTS if find_spec(mod) is None]
    if tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        # clip_benchmark 1.6.2 calls float() on a 1-element array, an error since NumPy 2.4:
        # the venv gets its own older numpy, shadowing ours for that process only
        missing.append("numpy==2.3.5")
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    key = hashlib.sha256(json.dumps([sys.version, parents, missing]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctp"
    venv = cache / f"clip_benchmark-1.6.2-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (xdist, parallel CI jobs)
        if (venv / ".ready").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        out = subprocess.run(
            [str(_venv_python(venv)), "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
        )
        own = Path(out.stdout.strip())
        (own / "ctp-parent-env.pth").write_text("".join(f"{p}\n" for p in parents))
        if find_spec("pycocoevalcap") is None:
            for module, cls in PYCOCOEVALCAP_STUB.items():
                path = own / "pycocoevalcap" / f"{module}.py"
                path.parent.mkdir(parents=True, exist_ok=True)
                (path.parent / "__init__.py").touch()
                path.write_text(
                    f"class {cls}:\n    def __init__(self, *a, **k):\n"
                    f"        raise NotImplementedError('pycocoevalcap stub (ctp tests)')\n"
                )
            (own / "pycocoevalcap" / "__init__.py").touch()
        if missing:
            # pip from the parent env (visible through the .pth), installing into this venv
            subprocess.run(
                [
                    str(_venv_python(venv)),
                    "-m",
                    "pip",
                    "install",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--no-input",
                    *missing,
                ],
                check=True,
            )
        (venv / ".ready").touch()
    return venv


def run_clip_benchmark(venv: Path, *, dataset: Path, task: str, checkpoint: Path, out: Path) -> dict:
    cmd = [
        str(venv / "bin" / "clip_benchmark"),
        "eval",
        "--dataset",
        f"wds/{dataset.name}",
        "--dataset_root",
        str(dataset),
        "--task",
        task,
        "--model",
        f"local-dir:{checkpoint}",
        "--pretrained",
        "",
        "--no_amp",
        "--recall_k",
        "1",
        "5",
        "10",
        "--output",
        str(out),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["metrics"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip-benchmark")
    # 8 classes x 5 images = 40 classification images; the retrieval set takes up to 40 of them
    stream = make_stream(
        tmp / "stream", SyntheticConfig(num_classes=8, num_chunks=1, train_per_class=40, eval_per_class=5)
    )
    # some epochs on the 320 training pairs (~10 s): predictions spread over the classes instead of
    # a random model's one or two, so agreeing is not trivial
    bundle = create_model(MODEL, seed=0)
    pairs = read_chunk(stream.chunks[0])
    images = torch.stack([bundle.preprocess_val(decode_image(p.image)) for p in pairs])
    train_on_chunk(
        bundle.model,
        images=images,
        texts=[p.text for p in pairs],
        tokenizer=bundle.tokenizer,
        strategy=get_strategy("finetune"),
        epochs=15,
        batch_size=32,
        lr=3e-3,
        warmup_steps=5,
        progress=False,
    )
    ckpt = save_checkpoint(tmp / "checkpoint", bundle.model, {"model": MODEL})
    return tmp, stream, ckpt


def test_clip_benchmark_matches_ctp_evaluate(setup, capsys):
    tmp, stream, ckpt = setup
    venv = clip_benchmark_venv()
    bundle, _ = load_checkpoint(ckpt)
    kw = {"preprocess": bundle.preprocess_val, "tokenizer": bundle.tokenizer, "device": "cpu"}

    cls = load_classification_set(stream.classification)
    assert len(cls.images) == 40 and len(cls.classnames) == 8
    result = evaluate_classification(bundle.model, cls, **kw)
    assert len(set(result.predictions)) >= 4  # not a collapsed model
    ours = result.metrics
    theirs = run_clip_benchmark(
        venv,
        dataset=stream.classification,
        task="zeroshot_classification",
        checkpoint=ckpt,
        out=tmp / "cls.json",
    )
    with capsys.disabled():
        print(f"\nclassification: CLIP_benchmark {theirs}\n                ctp            {ours}")
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k] == pytest.approx(ours[k], abs=1e-6), k  # ctp averages in float32

    ret = load_retrieval_set(stream.retrieval)
    ours = evaluate_retrieval(bundle.model, ret, ks=(1, 5, 10), **kw)
    theirs = run_clip_benchmark(
        venv, dataset=stream.retrieval, task="zeroshot_retrieval", checkpoint=ckpt, out=tmp / "ret.json"
    )
    with capsys.disabled():
        print(f"retrieval: CLIP_benchmark {theirs}\n           ctp            {ours}")
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k] == pytest.approx(ours[k], abs=1e-6), k  # ctp averages in float32
