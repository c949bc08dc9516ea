"""``ctp export CHECKPOINT_DIR --out DIR``: a checkpoint in the layout open_clip reads from the Hub.

``DIR`` gets ``open_clip_config.json``, ``open_clip_model.safetensors`` (safetensors only, never
pickle) and a ``README.md`` model card stub: upload it as a Hugging Face model repo and
``open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`` loads it; locally
``"local-dir:DIR"`` does. The checkpoint is loaded first (strict), so a broken one is refused.
Only these three files in ``DIR`` are replaced, each atomically; anything else there (a clone's
``.git``) is left alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ctp.atomic import atomic_file

HUB_WEIGHTS_NAME = "open_clip_model.safetensors"  # the name hf-hub: loading tries first
CARD_NAME = "README.md"


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out/`` (created if needed) from the ctp checkpoint directory ``checkpoint``."""
    from ctp.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, open_clip_config

    src, out = Path(checkpoint), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from the checkpoint directory")
    bundle, meta = load_checkpoint(src)
    stored = src / CONFIG_NAME
    if stored.is_file():
        config = json.loads(stored.read_text(encoding="utf-8"))
    else:  # a checkpoint from before open_clip_config.json
        config = open_clip_config(bundle.model, bundle.config)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / HUB_WEIGHTS_NAME) as tmp:
        shutil.copyfile(src / WEIGHTS_NAME, tmp)  # the very bytes just loaded
    with atomic_file(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    with atomic_file(out / CARD_NAME) as tmp:
        tmp.write_text(model_card(meta, config), encoding="utf-8")
    return out


def model_card(meta: dict[str, Any], config: dict[str, Any]) -> str:
    """A README.md stub: Hub metadata, what the model is, how to load it, ctp's recorded metrics."""
    name = meta.get("model", "?")
    cfg = config.get("model_cfg", {})
    lines = [
        "---",
        "library_name: open_clip",
        "tags:",
        "- clip",
        "- open_clip",
        "- continual-learning",
        "- ctp",
        "---",
        "",
        f"# {name} (ctp checkpoint{', version ' + str(meta['version']) if 'version' in meta else ''})",
        "",
        f"A CLIP model (open_clip architecture `{name}`, embedding dim {cfg.get('embed_dim', '?')}, "
        f"image size {cfg.get('vision_cfg', {}).get('image_size', '?')}) trained continually by ctp"
        + (f" with strategy `{meta['strategy']}`" if meta.get("strategy") else "")
        + (f" on {meta['chunks']} chunk(s)" if meta.get("chunks") is not None else "")
        + ".",
        "",
        "TODO: training data, intended use, limitations, license.",
        "",
        "## Use",
        "",
        "```python",
        "import open_clip",
        "",
        'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:ORG/NAME")',
        'tokenizer = open_clip.get_tokenizer("hf-hub:ORG/NAME")',
        "```",
        "",
        'From a local copy of this folder use `"local-dir:PATH"` instead. No `import ctp` needed.',
    ]
    rows = []  # meta["metrics"]: {eval set: {metric: value}}
    for set_name, values in sorted((meta.get("metrics") or {}).items()):
        items = values.items() if isinstance(values, dict) else [("", values)]
        rows += [
            (set_name, k, v)
            for k, v in sorted(items)
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
    if rows:
        lines += [
            "",
            "## Metrics recorded by ctp",
            "",
            "| eval set | metric | value |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {s} | {k} | {v:.4g} |" for s, k, v in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ctp export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="ctp checkpoint directory (model.safetensors + meta.json)")
    p.add_argument("--out", required=True, help="output directory (Hub layout)")
    args = p.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
