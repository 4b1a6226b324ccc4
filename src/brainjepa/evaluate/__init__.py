"""Downstream evaluation: embeddings, readouts, probes, baselines, metrics, the split protocol,
fine-tuning and interpretation.

The protocol (:mod:`.protocol`), for every target and split seed: split the subjects 60/20/20
into train / validation / test (stratified for classification, or a user-given split column),
fit every method on train, choose its regularisation or epoch on validation only, and evaluate
the test split exactly once. Results are mean +- std (sample std, ddof = 1) over split seeds, one
row per (method, target, metric), and every method sees the same splits, so methods can be
compared pair by pair, seed by seed.

What the encoder sees (:mod:`.features`). Each scan is resampled to the model's TR and tiled
with evenly spaced windows of the model's length that together cover it
(:meth:`BrainJEPA.prepare_windows`; a scan shorter than one window is encoded on its real time
patches only); ``windows="center"`` keeps only the centre window instead. Each window is encoded
once and its token features h (R, p, D) are summarised by one or more *readouts*; a subject's
embedding under a readout is the average of that readout over its windows:

- ``mean``: mean over all tokens, then LayerNorm without affine (:meth:`BrainJEPA.embed`);
- ``roi``: per ROI, the mean and the std of each feature over the time patches (R * 2D);
- ``fc``: ROI x ROI correlation of the token features over time: each ROI's (p, D) features
  centred over time and flattened, cosine between ROIs, Fisher-z, strict upper triangle.

Mean pooling discards how ROIs co-vary over time, which is what FC measures; the ``roi`` and
``fc`` readouts keep first- and second-order structure, so a weak ``mean`` row does not by
itself show that the features lack the information.

Methods in every table, on the same splits (:mod:`.comparisons`, :mod:`.cohort`):

- ``brainjepa:<readout>``: the pretrained encoder, frozen, then a probe;
- ``random_init#<k>:<readout>``: the same architecture initialised with seed k (several seeds,
  3 by default: the spread between seeds can exceed the gap to the pretrained model), probed
  identically; ``random_init(mean):<readout>`` averages them per split seed and
  ``random_init(best):<readout>`` is the seed with the best mean headline metric (AUROC or
  Pearson r) over split seeds. That choice looks at test results, so it is an optimistic
  reference for random initialisation: beating it is the stricter test;
- ``fc_full``: the Fisher-z FC upper triangle of the full raw scan (FC at its strongest);
- ``fc_window``: the FC of exactly the windows the encoder sees, Fisher-z averaged over them;
- ``amplitude``: per-ROI log temporal std of the full resampled scan (of percent signal
  change when the scan looks like raw BOLD), a first-order signal that needs no model.

The FC and amplitude baselines always use the closed-form probe. :func:`compare` gives paired
differences over split seeds (mean, 95% t interval, two-sided paired t-test, wins), and
:func:`probe_cohort` reports them for the pretrained model against each reference.

Probes (:mod:`.probes`). ``closed-form`` (default): ridge regression or L2 logistic regression
on standardised embeddings, regularisation chosen on validation. ``bn-linear``: the paper's
linear probe, BatchNorm (no affine) + Linear trained with AdamW for 50 epochs, epoch chosen on
validation. Because the encoder is frozen and evaluation windows are deterministic, the
embeddings are computed once and cached: training the head on cached embeddings gives exactly
the gradients it would get from running the encoder every step, at a fraction of the cost.
Selection criterion everywhere: the validation loss (cross-entropy or MSE on normalised labels),
which is continuous where accuracy on a small validation split is not.

Regression labels are normalised with the training split's mean and std; every metric is
reported in the original units. Fine-tuning lives in :mod:`.finetune` (methods
:data:`METHODS`; a few windows per subject, one drawn per epoch in training and all averaged at
test time; early stopping on the validation loss); it and the BN-linear probe share one
keep-best-epoch training loop (:mod:`.training`). Attention maps for
interpretation: :mod:`.interpret`.

Brain states (:mod:`.states`): a label that changes within a scan (task blocks, a change of
regime) is decoded from every window on its own, with splits that keep subjects apart, against
random init and the FC, amplitude and level (mean relative to the scan) of the same window
(:func:`probe_states`).

Modules: :mod:`.metrics`, :mod:`.labels`, :mod:`.features`, :mod:`.training`, :mod:`.probes`,
:mod:`.comparisons`, :mod:`.protocol`, :mod:`.cohort`, :mod:`.states`, :mod:`.finetune`, :mod:`.finetune_data`,
:mod:`.interpret`; cohort-scale embedding (shards, resume, several processes, ``--on-error skip``):
:mod:`.scans`, :mod:`.shards`, :mod:`.embedjob`.
Every public name is importable from this package.
"""

from __future__ import annotations

from ..data import CohortSeries
from .baselines import RAW_BOLD_MEAN_OVER_STD, amplitude_features, fc_features, window_fc
from .cohort import (
    cohort_amplitude,
    cohort_fc,
    embed_cohort,
    load_cohort,
    probe_cohort,
    probe_features,
    save_embeddings,
)
from .comparisons import (
    BASELINES,
    COMPARISON_COLUMNS,
    MODEL,
    RANDOM_INIT,
    compare,
    comparison_cells,
    comparison_rows,
    format_comparisons,
    format_p,
    headline_metric,
    init_seeds,
    method_name,
    method_rank,
    probe_method_names,
    random_init_summaries,
)
from .embedjob import embed_to_file
from .features import (
    READOUTS,
    WINDOWS,
    BrainJEPAEmbedder,
    check_readouts,
    check_windows,
    encode_readouts,
    encode_windows,
    progress_bar,
    random_init_like,
    readout_features,
    repetition_times,
    resolve_device,
    subject_windows,
    token_index,
)
from .finetune import (
    HEAD_INITS,
    HEADS,
    METHODS,
    FineTuneModel,
    FineTuner,
    finetune_cohort,
    layer_id,
    make_optimizer,
    param_groups,
    set_drop_path,
)
from .finetune_data import finetune_windows, subject_windows_for_finetuning
from .interpret import (
    attention_received,
    encode_with_attention,
    network_attention,
    network_labels_from_roi_names,
    read_networks,
    roi_attention,
)
from .labels import (
    MAX_AUTO_CLASSES,
    MISSING,
    Split,
    Target,
    cohort_targets,
    encode_labels,
    infer_task,
    present_mask,
    split_from_column,
    split_indices,
    target_labels,
    user_split,
)
from .metrics import (
    HEADLINE_METRIC,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    classification_metrics,
    regression_metrics,
    roc_auc,
)
from .probes import (
    PROBES,
    RELATIVE_GRID,
    BNLinearProbe,
    ClosedFormProbe,
    ProbeBase,
    binary_logistic,
    make_probe,
)
from .protocol import Method, Results, format_mean_std, format_table, result_grid, run_protocol, run_targets
from .scans import ScanList, open_inputs, usable_cohort
from .shards import DEFAULT_SHARD_SIZE, EmbeddingJob, EmbedReport
from .states import (
    STATE_BASELINES,
    STATE_TARGET,
    cohort_states,
    events_states,
    probe_states,
    probe_windows,
    scan_means,
    scan_scaled,
    state_labels,
    subject_split,
    window_baselines,
    window_features,
    window_states,
)
from .training import EpochLog, class_weights, make_loss, predict_batches, set_lr, train_keep_best

# the table order under its former private name, which brainjepa.report imports
_method_rank = method_rank

__all__ = [
    "STATE_BASELINES",
    "STATE_TARGET",
    "cohort_states",
    "events_states",
    "probe_states",
    "probe_windows",
    "scan_means",
    "scan_scaled",
    "state_labels",
    "subject_split",
    "window_baselines",
    "window_features",
    "window_states",
    "DEFAULT_SHARD_SIZE",
    "EmbedReport",
    "EmbeddingJob",
    "ScanList",
    "embed_to_file",
    "open_inputs",
    "usable_cohort",
    "BASELINES",
    "COMPARISON_COLUMNS",
    "HEADLINE_METRIC",
    "LOWER_IS_BETTER",
    "MAX_AUTO_CLASSES",
    "HEAD_INITS",
    "HEADS",
    "METHODS",
    "METRIC_NAMES",
    "MISSING",
    "MODEL",
    "PROBES",
    "RANDOM_INIT",
    "RAW_BOLD_MEAN_OVER_STD",
    "READOUTS",
    "RELATIVE_GRID",
    "WINDOWS",
    "BNLinearProbe",
    "BrainJEPAEmbedder",
    "ClosedFormProbe",
    "CohortSeries",
    "EpochLog",
    "FineTuneModel",
    "FineTuner",
    "Method",
    "ProbeBase",
    "Results",
    "Split",
    "Target",
    "amplitude_features",
    "attention_received",
    "binary_logistic",
    "check_readouts",
    "check_windows",
    "class_weights",
    "classification_metrics",
    "cohort_amplitude",
    "cohort_fc",
    "cohort_targets",
    "compare",
    "comparison_cells",
    "comparison_rows",
    "embed_cohort",
    "encode_labels",
    "encode_readouts",
    "encode_windows",
    "encode_with_attention",
    "fc_features",
    "finetune_cohort",
    "finetune_windows",
    "format_comparisons",
    "format_mean_std",
    "format_p",
    "format_table",
    "headline_metric",
    "infer_task",
    "init_seeds",
    "layer_id",
    "load_cohort",
    "make_loss",
    "make_optimizer",
    "make_probe",
    "method_name",
    "method_rank",
    "network_attention",
    "network_labels_from_roi_names",
    "param_groups",
    "predict_batches",
    "present_mask",
    "probe_cohort",
    "probe_features",
    "probe_method_names",
    "progress_bar",
    "random_init_like",
    "random_init_summaries",
    "read_networks",
    "readout_features",
    "regression_metrics",
    "repetition_times",
    "resolve_device",
    "result_grid",
    "roc_auc",
    "roi_attention",
    "run_protocol",
    "run_targets",
    "save_embeddings",
    "set_drop_path",
    "subject_windows_for_finetuning",
    "set_lr",
    "split_from_column",
    "split_indices",
    "subject_windows",
    "target_labels",
    "token_index",
    "train_keep_best",
    "user_split",
    "window_fc",
]
