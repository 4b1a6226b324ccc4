"""Model cards: the README.md of a bundle, written from what the run recorded.

A bundle folder opened on a model hub shows its README.md. :func:`model_card` writes it from the
model itself (architecture, parameter count, ROIs, TR, window, normalisation) and from its
provenance: the pretraining data summary, the recipe (the config keys that differ from the
preset), the last diagnostics and, when one was recorded, the pretrained-versus-random probe
result. Each of those comes from a file of the run (:func:`run_facts` reads them when a run is
exported; :func:`evaluation_summary` reads a ``brainjepa probe --out`` file); what was not
recorded is shown as "not recorded", never filled in.

The front matter is Hugging Face's model-card metadata (``library_name``, ``license``,
``tags``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .diagnostics import problems
from .errors import DataError
from .model import MODEL_SIZES
from .runio import read_metrics

CARD_FILE = "README.md"
# written by the pretraining loop (brainjepa.pretrain.loop): the data summary and the recipe
TRAINING_FILE = "training.json"
NOT_RECORDED = "not recorded"
DIAGNOSTICS = (
    "context_gain",
    "loss_own",
    "loss_other",
    "target_std",
    "target_cos",
    "context_std",
    "context_cos",
    "position_share",
    "subject_share",
    "effective_rank",
)
# the references a pretrained readout is compared with in a card, in this order
CARD_BASELINES = ("random_init(best)", "random_init(mean)", "fc_window", "fc_full")


# ------------------------------------------------------------------------ facts from a run


def last_diagnostics(metrics_file: str | Path, step: int | None = None) -> dict | None:
    """The last diagnostics a run wrote to its metrics.jsonl, up to a step.

    Args:
        metrics_file: the run's metrics.jsonl.
        step: the checkpoint's step (records after it are ignored); None: the last record.

    Returns:
        {"step": s, <diagnostic>: value, ...} from the last record with ``diag_*`` entries, or
        None when the file is missing or has none (``train.diagnose_every: 0``).
    """
    try:
        records = read_metrics(metrics_file)
    except DataError:
        return None
    for record in reversed(records):
        if step is not None and record.get("step", 0) > step:
            continue
        diag = {k[5:]: v for k, v in record.items() if k.startswith("diag_")}
        if diag:
            return {"step": record.get("step"), **diag}
    return None


def run_facts(run_dir: str | Path, step: int | None = None) -> dict:
    """What a pretraining run folder recorded for the model card.

    Args:
        run_dir: the run folder.
        step: the exported checkpoint's step (the diagnostics are the last ones up to it).

    Returns:
        Provenance entries: ``data_summary`` and ``recipe`` (from training.json) and
        ``diagnostics`` (from metrics.jsonl), each only when recorded.
    """
    run_dir = Path(run_dir)
    out: dict = {}
    path = run_dir / TRAINING_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        for key in ("data_summary", "recipe"):
            if key in recorded:
                out[key] = recorded[key]
    diag = last_diagnostics(run_dir / "metrics.jsonl", step)
    if diag is not None:
        out["diagnostics"] = diag
    return out


def evaluation_summary(results_file: str | Path) -> dict:
    """The pretrained-versus-reference comparisons of a probe results file, for a card.

    Args:
        results_file: a file written by ``brainjepa probe --out`` or the demo's results.json
            ({"rows": [...], "comparisons": [...]}).

    Returns:
        {"source": file name, "comparisons": [...]}: each comparison of a ``brainjepa:<readout>``
        method with a random initialisation or FC, with both methods' mean scores.

    Raises:
        DataError: a file that is missing, not JSON, or holds no such comparison.
    """
    path = Path(results_file)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable probe results file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("comparisons"), list):
        raise DataError(f"{path}: no 'comparisons' list; write it with `brainjepa probe ... --out FILE`")
    means = {(r["method"], r["target"], r["metric"]): r.get("mean") for r in data.get("rows", [])}
    keep = []
    for c in data["comparisons"]:
        base = str(c.get("baseline", "")).split(":", 1)[0]
        if not str(c.get("method", "")).startswith("brainjepa:") or base not in CARD_BASELINES:
            continue
        key = (c["target"], c["metric"])
        entry = {
            **{k: c.get(k) for k in ("target", "metric", "method", "baseline", "n", "mean_diff", "p_value")},
            **{k: c.get(k) for k in ("ci95_low", "ci95_high", "wins")},
            "method_mean": means.get((c["method"], *key)),
            "baseline_mean": means.get((c["baseline"], *key)),
        }
        # NaN (e.g. no p-value for identical differences) is JSON null, as in the results file
        keep.append({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()})
    if not keep:
        raise DataError(
            f"{path}: no comparison of the pretrained model with a random initialisation or FC; "
            "probe with --random-init-seeds 1 or more"
        )
    return {"source": path.name, "comparisons": keep}


# ---------------------------------------------------------------------------------- the card


def parameter_count(module) -> int:
    """Trainable parameters of a module (buffers such as the gradients excluded).

    Args:
        module: a torch module, or None.

    Returns:
        The count (0 for None).
    """
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _num(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _size_name(cfg) -> str | None:
    for name, arch in MODEL_SIZES.items():
        if all(getattr(cfg, k) == v for k, v in arch.items()):
            return name
    return None


def _front_matter(converted: bool, license_id: str) -> str:
    tags = ["brainjepa", "brain-jepa", "fmri", "neuroscience", "self-supervised", "jepa", "time-series"]
    lines = ["---", "library_name: brainjepa", f"license: {license_id}"]
    if converted:
        lines.append("license_name: authors-terms")
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["pipeline_tag: feature-extraction", "---", ""]
    return "\n".join(lines)


def _architecture(model, config: dict) -> list[str]:
    cfg = model.config
    size = _size_name(cfg)
    enc, pred = parameter_count(model.encoder), parameter_count(model.predictor)
    lines = [
        "## Architecture",
        "",
        f"- Encoder: {size + ' size, ' if size else ''}width {cfg.embed_dim}, {_count(cfg.depth, 'block')}, "
        f"{_count(cfg.num_heads, 'head')}: **{enc:,} parameters**",
        f"- Predictor: width {cfg.predictor_embed_dim}, {_count(cfg.predictor_depth, 'block')}, "
        f"{_count(cfg.predictor_num_heads, 'head')}: "
        + (f"{pred:,} parameters (included)" if model.predictor is not None else "not included in this bundle"),
        f"- Tokens: {cfg.n_rois} ROIs x {cfg.n_patches} time patches of {cfg.patch_size} frames "
        f"({cfg.n_rois * cfg.n_patches:,} tokens per window)",
        f"- Positions: {config.get('pos_embed', NOT_RECORDED)}; {cfg.n_gradients} brain gradients per ROI",
        f"- Weights: {config.get('encoder_weights') or NOT_RECORDED} (loss {config.get('loss') or NOT_RECORDED})",
        "",
    ]
    return lines


def _inputs(model) -> list[str]:
    cfg = model.config
    labels = model.roi_labels
    if labels:
        shown = ", ".join(labels[:5]) + (f", ..., {', '.join(labels[-2:])}" if len(labels) > 7 else "")
        label_line = f"- ROI labels (model order, all of them in `gradients.csv`): {shown}"
    else:
        label_line = "- ROI labels: not recorded (the ROI order must match the training data's)"
    tr = model.target_tr
    window = f"{cfg.n_timepoints} frames" + (f" = {cfg.n_timepoints * tr:g} s at TR {tr:g} s" if tr else "")
    norm = model.normalization
    method = norm.get("method")
    scope = norm.get("scope", "window")
    if method == "unknown":
        norm_line = "- Normalisation: **not recorded** with these weights; choose one (`model.set_normalization`)"
    elif method == "robust":
        norm_line = (
            "- Normalisation: robust, (x - median) / IQR per ROI with statistics of the training "
            "cohort, stored in `normalization.json` and applied by `model.prepare`"
        )
    else:
        norm_line = f"- Normalisation: {method} (per scan, scope `{scope}`), applied by `model.prepare`"
    return [
        "## Input",
        "",
        f"- {cfg.n_rois} ROIs (parcellated fMRI, ROIs x time points)",
        label_line,
        f"- TR: {tr:g} s; every scan is resampled from its own TR to it"
        if tr
        else "- TR: not recorded (scans are used at their native TR)",
        f"- Window: {window}; a longer scan is covered by evenly spaced windows, a shorter one "
        "is encoded on its real time patches",
        norm_line,
        "",
    ]


def _data(prov: dict) -> list[str]:
    lines = ["## Pretraining data", ""]
    summary = prov.get("data_summary")
    if isinstance(summary, dict):
        trs = summary.get("native_trs") or []
        lines += [
            f"- Scans: {summary.get('n_scans', NOT_RECORDED)} (training split), subjects: "
            f"{summary.get('n_subjects', NOT_RECORDED)}",
            f"- Frames: {summary.get('n_frames', NOT_RECORDED):,} at native TR(s) "
            f"{', '.join(f'{t:g} s' for t in trs) if trs else NOT_RECORDED}"
            if isinstance(summary.get("n_frames"), int)
            else f"- Frames: {NOT_RECORDED}",
            f"- Trained at TR {summary.get('target_tr', NOT_RECORDED)} s; ROIs: {summary.get('n_rois', NOT_RECORDED)}",
            f"- Source: `{summary.get('source', NOT_RECORDED)}`",
        ]
    elif isinstance(prov.get("training_data"), str):  # a converted checkpoint says it in words
        lines.append(f"- {prov['training_data']}")
    else:
        lines.append(f"- {NOT_RECORDED}")
    return lines + [""]


def _recipe(prov: dict) -> list[str]:
    lines = ["## Recipe", ""]
    recipe = prov.get("recipe")
    steps = prov.get("step") if prov.get("step") is not None else prov.get("steps")
    if prov.get("source") == "brainjepa pretrain":
        lines.append(f"- Exported at step {_num(steps)} (epoch {_num(prov.get('epoch'))})")
    elif prov.get("epoch") is not None:
        lines.append(f"- The authors' checkpoint after epoch {prov['epoch']}")
    if isinstance(recipe, dict):
        changes = recipe.get("changes") or {}
        lines.append(
            f"- Config: the `{recipe.get('preset')}` preset" + (" with these changes:" if changes else " unchanged")
        )
        if changes:
            lines += ["", "| key | preset | this run |", "|---|---|---|"]
            lines += [f"| `{k}` | `{v[0]!r}` | `{v[1]!r}` |" for k, v in changes.items()]
    else:
        lines.append(f"- Config diff from the preset: {NOT_RECORDED}")
    return lines + [""]


def _diagnostics(prov: dict) -> list[str]:
    lines = ["## Diagnostics (last recorded during pretraining)", ""]
    diag = prov.get("diagnostics")
    if not isinstance(diag, dict):
        return lines + [f"- {NOT_RECORDED}", ""]
    lines += [
        f"At step {diag.get('step')}, on one training batch:",
        "",
        f"- Context gain (predictor loss with another subject's context over its own, minus 1): "
        f"{_num(diag.get('context_gain'), '+.3f')}",
        f"- Collapse: target encoder feature std {_num(diag.get('target_std'))}, token cosine "
        f"{_num(diag.get('target_cos'), '.3f')}; context encoder {_num(diag.get('context_std'))} / "
        f"{_num(diag.get('context_cos'), '.3f')}",
        f"- Variance share of token position {_num(diag.get('position_share'), '.3f')}, of the subject "
        f"{_num(diag.get('subject_share'), '.3f')}",
    ]
    if all(isinstance(diag.get(k), (int, float)) for k in DIAGNOSTICS[:-1]):
        found = problems(diag)
        lines.append(f"- Verdict: {'; '.join(found) if found else 'healthy (context used, no collapse)'}")
    return lines + [""]


def _evaluation(prov: dict) -> list[str]:
    lines = ["## Intended use and limitations", ""]
    lines += [
        "Frozen feature extraction from parcellated fMRI (embeddings for linear probes, "
        "fine-tuning) in research. Not a diagnostic tool. Features of a self-supervised encoder "
        "are not guaranteed to beat simple references: always compare with the same architecture "
        "randomly initialised and with functional connectivity (`brainjepa probe` reports both).",
        "",
    ]
    ev = prov.get("evaluation")
    if not isinstance(ev, dict) or not ev.get("comparisons"):
        return lines + [
            "Pretrained versus random initialisation: **not recorded** for this model. Measure it "
            "before relying on it: `brainjepa probe BUNDLE DATA --target COLUMN --out results.json`, "
            "then `brainjepa export RUN_DIR --evaluation results.json` puts the result here.",
            "",
        ]
    lines += [
        f"Measured (from `{ev.get('source')}`; paired over split seeds, difference = pretrained minus reference):",
        "",
        "| target | metric | pretrained | reference | pretrained mean | reference mean "
        "| difference [95% CI] | p | wins |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in ev["comparisons"]:
        lines.append(
            f"| {c['target']} | {c['metric']} | {c['method']} | {c['baseline']} | {_num(c.get('method_mean'), '.3f')} "
            f"| {_num(c.get('baseline_mean'), '.3f')} | {_num(c.get('mean_diff'), '+.3f')} "
            f"[{_num(c.get('ci95_low'), '+.3f')}, {_num(c.get('ci95_high'), '+.3f')}] "
            f"| {_num(c.get('p_value'), '.3g')} | {c.get('wins')}/{c.get('n')} |"
        )
    worse = [
        c
        for c in ev["comparisons"]
        if str(c["baseline"]).startswith("random_init") and isinstance(c.get("wins"), int) and c.get("n")
    ]
    if worse and all(c["wins"] * 2 <= c["n"] for c in worse):
        lines += [
            "",
            "**The pretrained encoder did not beat its random initialisation** in these "
            "comparisons: use its features only next to those references.",
        ]
    return lines + [""]


def model_card(model, config: dict, provenance: dict | None = None) -> str:
    """The README.md of a bundle.

    Args:
        model: the :class:`~brainjepa.bundle.BrainJEPA` being saved.
        config: its config.json content (:func:`~brainjepa.bundle_files.bundle_config`).
        provenance: the provenance being saved; None: the model's.

    Returns:
        The Markdown text, with Hugging Face front matter.
    """
    prov = (model.provenance if provenance is None else provenance) or {}
    converted = "convert-official" in str(prov.get("source", ""))
    license_id = prov.get("license") or ("other" if converted else "mit")
    title = "Brain-JEPA (the authors' checkpoint, converted)" if converted else "Brain-JEPA encoder"
    lines = [
        _front_matter(converted, license_id),
        f"# {title}",
        "",
        "A [brainjepa](https://pypi.org/project/brainjepa/) bundle: a Brain-JEPA encoder for "
        "parcellated fMRI time series with its brain gradients, ROI order, TR and input "
        f"normalisation. Written by brainjepa {config.get('brainjepa_version')} (bundle format "
        f"{config.get('format_version')}); source: {prov.get('source', NOT_RECORDED)}.",
        "",
        "```python",
        "from brainjepa import BrainJEPA",
        "from brainjepa.evaluate import BrainJEPAEmbedder",
        "",
        'model = BrainJEPA.from_pretrained("THIS_FOLDER_OR_HUB_ID")',
        "embeddings = BrainJEPAEmbedder(model).transform(scans, tr=tr)  # scans: (ROIs x time) arrays",
        "```",
        "",
    ]
    lines += _architecture(model, config) + _inputs(model) + _data(prov) + _recipe(prov)
    lines += _diagnostics(prov) + _evaluation(prov)
    if converted:
        lines += [
            "## Licence",
            "",
            "The weights are the authors' release, converted; the terms of their release apply. "
            "brainjepa itself is MIT-licensed.",
            "",
        ]
    else:
        lines += [
            "## Licence",
            "",
            f"Declared `{license_id}`. Check the terms of the pretraining data before sharing these weights.",
            "",
        ]
    lines += [
        "Weights: `model.safetensors` (sha256 `" + str(prov.get("model_sha256", NOT_RECORDED)) + "`); "
        "architecture `config.json`; provenance `provenance.json`.",
        "",
    ]
    return "\n".join(lines)
