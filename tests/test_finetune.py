"""Fine-tuning recipe: early stopping, windows as augmentation and test-time averaging, the
readout the head reads, and the windows a subject is fine-tuned on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from brainjepa.bundle import BrainJEPA
from brainjepa.errors import ConfigError, DataError
from brainjepa.evaluate import readout_features
from brainjepa.evaluate.finetune import FineTuneModel, FineTuner
from brainjepa.evaluate.finetune_data import finetune_windows, subject_windows_for_finetuning
from brainjepa.evaluate.probes import ClosedFormProbe
from brainjepa.evaluate.training import make_loss, predict_batches, train_keep_best

R, T_MODEL = 8, 32


def small_model(seed: int = 0) -> BrainJEPA:
    cfg = tiny_cfg(n_rois=R, n_timepoints=T_MODEL, patch_size=8, embed_dim=16, num_heads=2, n_gradients=3)
    torch.manual_seed(seed)
    g = np.random.default_rng(seed).normal(size=(R, 3))
    return BrainJEPA(cfg, g, normalization={"method": "zscore"}, target_tr=1.0).eval()


def test_patience_stops_early_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    X, X_val = torch.randn(40, 3), torch.randn(20, 3)
    w = torch.tensor([1.0, -2.0, 0.5])
    t, t_val = X @ w, X_val @ w
    loss_fn = make_loss("regression", t.numpy(), 1, None)
    seen = []

    def on_epoch(epoch, model, out_val):  # the outputs the validation loss was computed from
        seen.append(epoch)
        assert not model.training and out_val.shape == (20, 1)
        with torch.no_grad():
            assert float(loss_fn(out_val, t_val, weighted=False)) == pytest.approx(float(loss_fn(model(X_val), t_val)))

    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    history = train_keep_best(
        net,
        opt,
        loss_fn,
        X,
        t,
        X_val,
        t_val,
        epochs=50,
        n_batches=4,
        lr_at=lambda step: 0.1 if step < 12 else 3.0,  # sane for 3 epochs, then divergent
        generator=torch.Generator(),
        patience=3,
        on_epoch=on_epoch,
    )
    assert history.stopped_early and len(history.val_losses) < 50
    assert len(history.val_losses) == history.best_epoch + 4  # 3 epochs without a better one, then stop
    assert seen == list(range(len(history.val_losses)))
    val = float(loss_fn(predict_batches(net, X_val), t_val, weighted=False))
    assert val == pytest.approx(min(history.val_losses), rel=1e-6)
    with pytest.raises(ConfigError, match="patience"):
        train_keep_best(
            net, opt, loss_fn, X, t, X_val, t_val, epochs=2, n_batches=1, lr_at=lambda s: 0.1,
            generator=torch.Generator(), patience=0,
        )  # fmt: skip


@pytest.mark.parametrize("readout", ["mean", "fc"])
def test_windows_are_drawn_in_training_and_averaged_in_eval(readout):
    model = small_model()
    net = FineTuner(model, "regression", drop_path=0.0, readout=readout).build(2)
    x = torch.randn(5, 3, R, T_MODEL)
    net.eval()
    each = torch.stack([net(x[:, w]) for w in range(3)], dim=1)  # (5, 3, 2)
    torch.testing.assert_close(net(x), each.mean(dim=1))
    if readout == "fc":  # BatchNorm would use batch statistics in training: compare in eval mode
        return
    net.train()
    torch.manual_seed(0)
    out = net(x)
    torch.manual_seed(0)
    pick = torch.randint(3, (5,))
    torch.testing.assert_close(out, each[torch.arange(5), pick])
    assert len(set(pick.tolist())) > 1  # different subjects got different windows


def test_fc_head_reads_the_token_correlations_and_trains_the_encoder():
    model = small_model()
    net = FineTuneModel(model.encoder, 1, readout="fc").eval()
    x = torch.randn(4, R, T_MODEL)
    tokens = net.encoder(x).reshape(4, R, model.config.n_patches, -1)
    net.shift.fill_(0.1)
    net.scale.fill_(2.0)
    expected = net.head((readout_features(tokens, "fc") - 0.1) / 2.0)
    torch.testing.assert_close(net(x), expected)
    assert net.head.in_features == R * (R - 1) // 2
    net.train()
    net(x).sum().backward()
    assert net.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="readout"):
        FineTuneModel(model.encoder, 1, readout="cls")


def test_finetune_windows_cover_the_scan_and_one_window_is_the_centre():
    model = small_model()
    rng = np.random.default_rng(0)
    series = [rng.normal(size=(R, 70)).astype(np.float32) for _ in range(3)]
    one = finetune_windows(model, series, tr=1.0, n_windows=1)
    assert one.shape == (3, R, T_MODEL)
    torch.testing.assert_close(one[1], torch.as_tensor(model.prepare(series[1], tr=1.0)).as_subclass(torch.Tensor))
    three = finetune_windows(model, series, tr=1.0, n_windows=3)
    assert three.shape == (3, 3, R, T_MODEL)
    x = series[2]
    for w, start in zip(three[2], (0, 19, 38)):  # first to last start, evenly spaced
        window = x[:, start : start + T_MODEL]
        expected = (window - window.mean(1, keepdims=True)) / window.std(1, keepdims=True)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="n_windows"):
        subject_windows_for_finetuning(model, series[0], tr=1.0, n_windows=0)
    with pytest.raises(DataError, match="shorter than the model's window"):
        subject_windows_for_finetuning(model, series[0][:, :20], tr=1.0, n_windows=2)


def test_finetuner_with_windows_records_curves_and_stops_early():
    model = small_model()
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(24, 2, R, T_MODEL)), dtype=torch.float32)
    y = np.array([0, 1] * 12)
    ft = FineTuner(
        model, "classification", epochs=30, warmup_epochs=1, batch_size=8, patience=2, readout="fc", head_init="random"
    )
    ft.fit(X[:16], y[:16], X[16:], y[16:])
    n = len(ft.val_losses_)
    assert len(ft.train_losses_) == len(ft.val_scores_) == n
    assert ft.best_epoch_ == int(np.argmin(ft.val_losses_))
    assert ft.stopped_early_ == (n < 30) and n <= ft.best_epoch_ + 3
    assert all(0.0 <= s <= 1.0 for s in ft.val_scores_)  # validation AUROC per epoch
    proba = ft.predict_proba(X[16:])
    assert proba.shape == (8, 2) and np.allclose(proba.sum(1), 1)


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("readout", ["mean", "fc"])
def test_probe_initialised_head_starts_as_the_closed_form_probe(task, readout):
    model = small_model()
    rng = np.random.default_rng(2)
    X = torch.as_tensor(rng.normal(size=(30, 2, R, T_MODEL)), dtype=torch.float32)
    y = rng.normal(50, 10, 30) if task == "regression" else np.array([0, 1, 2] * 10)
    ft = FineTuner(model, task, readout=readout, head_init="probe", batch_size=7)
    ft._fit_labels(y[:20], None)
    net = ft.build(1 if task == "regression" else 3)
    score = ft._init_head(net, X[:20], y[:20], X[20:], y[20:], None)
    F, F_val = ft._subject_features(net, X[:20]), ft._subject_features(net, X[20:])
    probe = ClosedFormProbe(task).fit(F, y[:20], F_val, y[20:])
    out = predict_batches(net, X[20:]).double()  # eval: averaged over the 2 windows
    expected = probe._output(F_val)
    got = out.softmax(dim=1).numpy() if task == "classification" else out[:, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert np.isfinite(score)
    np.testing.assert_allclose(net.shift.numpy(), F.mean(0), rtol=1e-4, atol=1e-5)
    random = FineTuner(model, task, readout=readout, head_init="random")
    random._fit_labels(y[:20], None)
    assert (
        random._init_head(random.build(1 if task == "regression" else 3), X[:20], y[:20], X[20:], y[20:], None) is None
    )
    with pytest.raises(ConfigError, match="head_init"):
        FineTuner(model, task, head_init="zeros")


def test_keep_initial_keeps_starting_weights_that_no_epoch_beats():
    torch.manual_seed(0)
    X, X_val = torch.randn(40, 3), torch.randn(20, 3)
    w = torch.tensor([1.0, -2.0, 0.5])
    t, t_val = X @ w, X_val @ w
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():  # start at the exact solution: every step can only move away
        net.weight.copy_(w[None])
        net.bias.zero_()
    loss_fn = make_loss("regression", t.numpy(), 1, None)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    kw = dict(epochs=5, n_batches=2, lr_at=lambda step: 0.5, generator=torch.Generator())
    history = train_keep_best(net, opt, loss_fn, X, t, X_val, t_val, keep_initial=True, **kw)
    assert history.best_epoch == -1 and len(history.val_losses) == 5
    torch.testing.assert_close(net.weight.detach(), w[None])
    history = train_keep_best(net, opt, loss_fn, X, t, X_val, t_val, **kw)
    assert history.best_epoch >= 0  # without it an epoch is always kept
