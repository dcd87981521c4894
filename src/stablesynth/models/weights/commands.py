"""``stablesynth weights``: public pretrained weights into the encoder's layout (import, inspect, check).

Only the standard library, the argument types and the layout table (no torch) load with this
module, so ``stablesynth --help`` pays nothing for it; each handler imports the torch side when
it runs. Bad input (a file of another model, a truncated file, shapes that do not fit the preset)
ends in one line and exit status 2, and no output file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from stablesynth.models.weights.layouts import SOURCE_KINDS
from stablesynth_device.argtypes import existing_path, int_at_least, output_dir, output_file


def _safetensors_out(text: str) -> Path:
    p = output_file("--out")(text)
    if p.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"--out {text}: must end in .safetensors (the manifest goes beside it "
                                         "as .json)")
    return p


def _override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``, the value read as YAML (``16``, ``1e-12``, ``true``), as in a run config."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE (an encoder_overrides entry)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--set {text!r}: the value is not a YAML scalar") from None


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser(
        "weights", help="import timm / Hugging Face / All-in-One weights into the encoder; inspect; check",
        description=("Public pretrained weights, converted into the encoder's own layout for one preset and "
                     "checked: the converted file is what encoder_overrides.vision_weights points at "
                     "(docs/weights.md). Nothing is downloaded; pickled files are read by an allow-list "
                     "unpickler that refuses code before it runs."))
    wsub = w.add_subparsers(dest="weights_command", metavar="WEIGHTS")

    imp = wsub.add_parser(
        "import", help="convert a local checkpoint into the encoder's layout for a preset",
        description=("Reads SRC (a .safetensors, .ckpt/.pth/.pt/.bin file or a Hugging Face folder), maps its keys "
                     "(query/key/value stacked, the distillation token dropped, positions resampled, All-in-One's "
                     "folds), checks every shape against the preset, every weight is finite and the source's "
                     "config against the preset's architecture, and writes --out and its manifest (.json) "
                     "atomically. Prints the encoder_overrides to use."))
    imp.add_argument("--from", dest="kind", choices=SOURCE_KINDS, required=True,
                     help="the source layout (hf: ViT or DeiT, read from config.json)")
    imp.add_argument("src", metavar="SRC", type=existing_path("SRC"), help="a checkpoint file or a Hugging Face folder")
    imp.add_argument("--preset", required=True, help="the encoder preset (allinone-ti, allinone-cpu, allinone-test)")
    imp.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                     help="an encoder_overrides entry of the run config the file is for (e.g. max_text_len=16)")
    imp.add_argument("--out", type=_safetensors_out, required=True, metavar="FILE.safetensors")
    imp.add_argument("--force", action="store_true", help="replace an existing --out")
    imp.set_defaults(func=_import)

    ins = wsub.add_parser(
        "inspect", help="what a checkpoint is: layout guessed, tensors, where each key goes, what is dropped",
        description=("Reads SRC without running anything in it and prints its container, the layout each table "
                     "recognises (share of keys), every tensor with its shape and where the layout sends it "
                     "(or why it is dropped), and what else the file carries. With --preset it also converts "
                     "in memory and reports the result or the first reason it does not fit."))
    ins.add_argument("src", metavar="SRC", type=existing_path("SRC"), help="a checkpoint file or a Hugging Face folder")
    ins.add_argument("--from", dest="kind", choices=SOURCE_KINDS, default=None,
                     help="the layout to read it as (default: the best guess)")
    ins.add_argument("--preset", default=None, help="also convert for this encoder preset (nothing is written)")
    ins.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE")
    ins.add_argument("--json", type=output_file("--json"), default=None, help="also write the report as JSON")
    ins.set_defaults(func=_inspect)

    chk = wsub.add_parser(
        "check", help="measure that imports compute what their sources compute (random sources, fp32)",
        description=("Builds random Hugging Face ViT and DeiT models, a timm file and an All-in-One checkpoint at "
                     "the preset's sizes, imports each and compares the encoder with the source on the same "
                     "input: max |difference| of every hidden state (All-in-One: every fused token), bound 1e-5. "
                     "Exit status 1 when one exceeds it."))
    chk.add_argument("--preset", default="allinone-test", help="the encoder preset (default allinone-test)")
    chk.add_argument("--seed", type=int_at_least("--seed", 0), default=0)
    chk.add_argument("--keep", type=output_dir("--keep"), default=None,
                     help="keep the sources and converted files in this folder (default: a temporary one)")
    chk.add_argument("--json", type=output_file("--json"), default=None, help="also write the figures as JSON")
    chk.set_defaults(func=_check)


def _config(preset: str, overrides: list[tuple[str, Any]]) -> Any:
    from stablesynth.models.encoder import ENCODERS

    return ENCODERS.get(preset).replace(**dict(overrides))


def _import(args: argparse.Namespace) -> int:
    from stablesynth.models.weights.convert import convert, write_conversion
    from stablesynth.models.weights.layouts import resolve
    from stablesynth.models.weights.reading import read_checkpoint

    if args.out.exists() and not args.force:
        raise ValueError(f"--out {args.out}: exists (pass --force to replace it)")
    cfg = _config(args.preset, args.overrides)
    ckpt = read_checkpoint(args.src)
    layout = resolve(args.kind, list(ckpt.tensors), ckpt.config)
    conversion = convert(ckpt, layout, cfg, args.preset)
    # The file fits the preset with --set's overrides, so the manifest's encoder_overrides carry them too.
    conversion.overrides = {**dict(args.overrides), **conversion.overrides}
    weights, manifest = write_conversion(conversion, args.out)
    print(f"wrote {weights}: {len(conversion.tensors)} encoder tensors from {layout.title} checkpoint {args.src} "
          f"({len(conversion.dropped)} source keys dropped; {manifest} says which and why)")
    for note in conversion.assumptions:
        print(f"assumed: {note}")
    overrides = {"vision_weights": str(weights), **conversion.overrides}
    print(f"use it with encoder {args.preset!r}: encoder_overrides: {json.dumps(overrides)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from stablesynth.files import atomic_write_json
    from stablesynth.models.weights.convert import convert, key_destinations
    from stablesynth.models.weights.layouts import LAYOUTS, guess, resolve
    from stablesynth.models.weights.reading import read_checkpoint

    ckpt = read_checkpoint(args.src)
    keys = list(ckpt.tensors)
    numel = sum(t.numel() for t in ckpt.tensors.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values()})
    where = f", the state dict under {ckpt.wrapper!r}" if ckpt.wrapper else ""
    where += f", prefix {ckpt.stripped_prefix!r} removed" if ckpt.stripped_prefix else ""
    print(f"{args.src}: {ckpt.container}{where}; {len(keys)} tensors, {numel:,} numbers ({', '.join(dtypes)})")
    if ckpt.config:
        fields = {k: ckpt.config[k] for k in ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size", "layer_norm_eps")
                  if k in ckpt.config}
        print(f"config.json: {json.dumps(fields)}")
    config = ckpt.hyper_parameters.get("config")
    if isinstance(config, dict):
        fields = {k: config[k] for k in ("vit", "hidden_size", "num_heads", "num_layers", "max_text_len", "num_frames",
                                         "image_size", "patch_size") if k in config}
        print(f"hyper_parameters['config']: {json.dumps(fields)}")
    for key, what in ckpt.extras.items():
        print(f"beside the weights: {key}: {what} (not used)")
    scores = guess(keys, ckpt.config)
    print("layouts: " + ", ".join(f"{name} knows {share:.0%} of the keys" for name, share in scores))
    if args.kind:
        layout = resolve(args.kind, keys, ckpt.config)
    elif scores and scores[0][1] > 0:
        layout = LAYOUTS.get(scores[0][0])
    else:
        print("no layout knows these keys: not a timm, Hugging Face ViT/DeiT or All-in-One checkpoint")
        return 0
    print(f"read as {layout.name} ({layout.description}):")
    destinations = key_destinations(ckpt, layout)
    width = max(len(k) for k in keys)
    for key in keys:
        t = ckpt.tensors[key]
        print(f"  {key:<{width}}  {list(t.shape)!s:<18} {str(t.dtype).removeprefix('torch.'):<8} "
              f"-> {destinations[key]}")
    report: dict[str, Any] = {"source": str(args.src), "container": ckpt.container, "wrapper": ckpt.wrapper,
                              "layouts": dict(scores), "read_as": layout.name, "extras": ckpt.extras,
                              "keys": {k: {"shape": list(ckpt.tensors[k].shape), "dtype": str(ckpt.tensors[k].dtype),
                                           "to": destinations[k]} for k in keys}}
    if args.preset:
        conversion = convert(ckpt, layout, _config(args.preset, args.overrides), args.preset)
        print(f"for preset {args.preset!r}: {len(conversion.tensors)} encoder tensors, {len(conversion.dropped)} "
              "source keys dropped")
        for key, note in conversion.notes.items():
            print(f"  {key}: {note}")
        for key, why in conversion.left.items():
            print(f"  {key}: {why}")
        for note in conversion.assumptions:
            print(f"  assumed: {note}")
        if conversion.overrides:
            print(f"  the file needs encoder_overrides {json.dumps(conversion.overrides)}")
        report["preset"] = {"name": args.preset, "notes": conversion.notes, "dropped": conversion.dropped,
                            "left_to_the_model": conversion.left, "overrides": conversion.overrides}
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _check(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from stablesynth.files import atomic_write_json
    from stablesynth.models.weights.equivalence import run_checks

    with tempfile.TemporaryDirectory(prefix="stablesynth-weights-") as tmp:
        results = run_checks(args.preset, Path(args.keep or tmp), args.seed)
    first = max(len(m.check) for m in results)
    width = max(len(m.compared) for m in results)
    print(f"{'check':<{first}}  {'compared':<{width}}  max |Δ|  of max |x|  bound")
    for m in results:
        bound = "reported" if m.bound is None else f"{m.bound:.0e} {'ok' if m.ok else 'EXCEEDED'}"
        print(f"{m.check:<{first}}  {m.compared:<{width}}  {m.max_abs_diff:.1e}  {m.scale:9.2f}  {bound}")
    if args.json:
        atomic_write_json(args.json, {"preset": args.preset, "seed": args.seed, "torch": torch.__version__,
                                      "transformers": transformers.__version__,
                                      "measurements": [m.to_dict() for m in results]})
    return 0 if all(m.ok for m in results) else 1
