"""pit at many ranks: the exact-co-state monitor, relayed co-states, --emulate."""
import h5py
import numpy as np
import pytest

from pitmpi import config, data
from pitmpi.cli import main
from pitmpi.io import read_result
from pitmpi.parallel.comm import run_emulated
from pitmpi.parallel.methods import make_trainer
from pitmpi.parallel.monitor import flat
from pitmpi.report import compare, summarise

SWISS = data.swissroll()
QUICK = ["model.layers=8", "coarse.iterations=20", "output.progress=false",
         "train.weight_decay=0"]
B = 16  # Swiss-roll batches per epoch (513 samples // 32)


def trained(size, overrides):
    """Each emulated rank's trainer after its run, and rank 0's result."""
    cfg = config.load(None, QUICK + overrides)

    def one(comm):
        t = make_trainer(comm, cfg, SWISS)
        return t, t.run()

    out = run_emulated(size, one)
    return [t for t, _ in out], out[0][1]


def exact_chain(trainers, g):
    """Batch ``g`` through the ranks' blocks serially: the state at each
    boundary and the exact co-state there, and each block's forward."""
    X, y = trainers[0].batch(g)
    states, ctxs, inp = [], [], X
    for t in trainers:
        blk = t.net.block(*t.layer_range())
        ctxs.append((blk, blk.forward(t.params, inp)))
        inp = ctxs[-1][1].output
        states.append(inp)
    lams, lam = [None] * len(trainers), None
    for i in range(len(trainers) - 1, -1, -1):
        blk, ctx = ctxs[i]
        lams[i] = lam
        lam, _, _ = blk.backward(trainers[i].params, ctx, lam_out=lam, y=y)
    return states, lams, ctxs, y


@pytest.mark.parametrize("size", [2, 3])
def test_monitor_measures_the_exact_costates_and_gradients(size):
    # one epoch, measured at its last iteration: the final controls and regressions
    trainers, result = trained(size, ["train.epochs=1", f"monitor.every={B}"])
    h = result.history
    assert h["monitor_iteration"].tolist() == [B - 1]
    assert h["monitor_costate_rel"].shape == (1, size - 1)
    assert h["monitor_grad_cos"].shape == (1, size - 1)
    states, lams, ctxs, y = exact_chain(trainers, B - 1)
    exact_all = predicted_all = 0.0
    dots = []
    for r, t in enumerate(trainers):
        blk, ctx = ctxs[r]
        _, g_exact, _ = blk.backward(t.params, ctx, lam_out=lams[r], y=y)
        g_exact = flat(g_exact)
        if r < size - 1:
            lam_hat = t.reg.predict(states[r], y)
            rel = np.linalg.norm(lam_hat - lams[r]) / np.linalg.norm(lams[r])
            np.testing.assert_allclose(h["monitor_costate_rel"][0, r], rel, rtol=1e-10)
            _, g_hat, _ = blk.backward(t.params, ctx, lam_out=lam_hat)
            g_hat = flat(g_hat)
            cos = g_hat @ g_exact / np.sqrt((g_hat @ g_hat) * (g_exact @ g_exact))
            np.testing.assert_allclose(h["monitor_grad_cos"][0, r], cos, rtol=1e-10)
            assert 0.0 < rel and cos < 1.0 - 1e-6  # predictions, not the exact co-states
        else:
            g_hat = g_exact
        dots.append((g_hat @ g_exact, g_hat @ g_hat, g_exact @ g_exact))
    total = np.sum(dots, axis=0)
    np.testing.assert_allclose(h["monitor_grad_cos_all"][0], total[0] / np.sqrt(total[1] * total[2]),
                               rtol=1e-10)


def test_monitor_changes_nothing_that_training_uses():
    _, plain = trained(3, ["train.epochs=2"])
    _, watched = trained(3, ["train.epochs=2", "monitor.every=5"])
    assert len(watched.history["monitor_iteration"]) == 2 * B // 5
    for k in plain.params:
        np.testing.assert_array_equal(plain.params[k], watched.params[k], err_msg=k)
    np.testing.assert_array_equal(plain.history["regression_rel"], watched.history["regression_rel"])
    # the monitor's sweeps are not training's traffic
    for k in ("rank_setup_traffic", "rank_iteration_traffic"):
        np.testing.assert_array_equal(plain.timing[k], watched.timing[k], err_msg=k)
    assert plain.timing["rank_iteration_traffic"][:, 1].min() > 0


def test_relayed_costates_are_the_exact_ones_of_their_batch(monkeypatch):
    """With controls that do not move (lr 1e-300), the co-state that rank 0
    learns from for batch h is the exact co-state of h at its boundary,
    relayed back through the middle rank; the neighbour's is not."""
    from pitmpi.parallel.pit import PitTrainer
    learnt = []
    original = PitTrainer.learn

    def spy(self, k, x, y, lam_hat, lam):
        if self.comm.rank == 0:
            learnt.append((k, x.copy(), lam.copy()))
        return original(self, k, x, y, lam_hat, lam)

    monkeypatch.setattr(PitTrainer, "learn", spy)
    size = 3
    for target in ("relayed", "neighbour"):
        learnt.clear()
        trainers, _ = trained(size, ["train.epochs=1", "train.lr=1e-300",
                                     f"regression.target={target}"])
        lag = 2 * size - 3 if target == "relayed" else 1  # iterations from feeding to learning
        assert len(learnt) == B - lag
        errors = []
        for k, x, lam in learnt:
            states, lams, _, _ = exact_chain(trainers, k - lag)
            np.testing.assert_array_equal(x, states[0])
            errors.append(np.linalg.norm(lam - lams[0]) / np.linalg.norm(lams[0]))
        if target == "relayed":
            assert max(errors) < 1e-12
        else:
            assert min(errors) > 1e-3


def test_relayed_on_two_ranks_is_the_neighbour_schedule():
    _, a = trained(2, ["train.epochs=2"])
    _, b = trained(2, ["train.epochs=2", "regression.target=relayed"])
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


def test_fallback_learns_exact_costates_and_updates_with_exact_gradients(monkeypatch):
    """monitor.fallback below any error it can reach: from the first
    measurement on, every iteration is an exact sweep. With controls that do
    not move (lr 1e-300), each boundary then learns the exact co-state of
    that iteration's batch, and each block's update uses its exact gradient."""
    from pitmpi.parallel.blocks import BlockTrainer
    from pitmpi.parallel.pit import PitTrainer
    learnt, steps = [], []
    original_learn, original_finish = PitTrainer.learn, BlockTrainer.finish_step

    def spy_learn(self, k, x, y, lam_hat, lam):
        learnt.append((self.layout.block, k, x.copy(), lam.copy()))
        return original_learn(self, k, x, y, lam_hat, lam)

    def spy_finish(self, grads, k, epoch, loss, lr=None):
        steps.append((self.layout.block, k, flat(grads)))
        return original_finish(self, grads, k, epoch, loss, lr)

    monkeypatch.setattr(PitTrainer, "learn", spy_learn)
    monkeypatch.setattr(BlockTrainer, "finish_step", spy_finish)
    size, every = 3, 5
    trainers, result = trained(size, ["train.epochs=1", "train.lr=1e-300", "train.momentum=0",
                                      f"monitor.every={every}", "monitor.fallback=1e-12"])
    exact = result.history["fallback_exact"]
    assert exact.tolist() == [0] * every + [1] * (B - every)
    rel = result.history["monitor_costate_rel"]
    assert np.isfinite(rel[0]).all() and np.isnan(rel[1:]).all()  # nothing to measure when exact
    for k in range(every, B):
        states, lams, ctxs, y = exact_chain(trainers, k)
        for r in range(size):
            blk, ctx = ctxs[r]
            if r < size - 1:
                (x, lam), = [(x, lam) for b, kk, x, lam in learnt if (b, kk) == (r, k)]
                np.testing.assert_array_equal(x, states[r])
                np.testing.assert_allclose(lam, lams[r], rtol=1e-12, atol=1e-300)
            _, g_exact, _ = blk.backward(trainers[r].params, ctx, lam_out=lams[r], y=y)
            (g,) = [g for b, kk, g in steps if (b, kk) == (r, k)]
            np.testing.assert_allclose(g, flat(g_exact), rtol=1e-10, atol=1e-300)


def test_fallback_above_every_error_changes_nothing():
    _, plain = trained(3, ["train.epochs=2", "monitor.every=5"])
    _, loose = trained(3, ["train.epochs=2", "monitor.every=5", "monitor.fallback=1e9"])
    assert not loose.history["fallback_exact"].any()
    for k in plain.params:
        np.testing.assert_array_equal(plain.params[k], loose.params[k], err_msg=k)


def test_fallback_returns_to_the_pipeline_and_reports_its_cost(tmp_path):
    out = tmp_path / "f.h5"
    argv = ["train", "--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20",
            "--set", "train.epochs=3", "--set", "monitor.every=4", "--set",
            "regression.ridge=1e-3", "--emulate", "4", "--out", str(out)]
    # a bound between the errors the monitor sees: some stretches exact, some pipelined
    rel = read_monitor(tmp_path, argv)
    bound = float(np.median(np.nanmax(rel, axis=1)))
    assert main(argv + ["--set", f"monitor.fallback={bound}"]) == 0
    attrs, _, h, _, _ = read_result(str(out))
    exact = h["fallback_exact"].astype(bool)
    assert 0 < exact.sum() < len(exact)
    assert (exact[:-1] & ~exact[1:]).any()  # returned to the pipeline at least once
    summary = summarise(str(out))
    assert f"{exact.sum()} iterations on exact co-states" in summary
    from pitmpi.report import load
    run = load(str(out))
    n_exact, fills, sweeps = run.fallback_counts(run.iterations)
    assert n_exact == exact.sum() and fills == 1 + int((exact[:-1] & ~exact[1:]).sum())
    pit, serial = run.estimate()
    a = run.attrs
    assert pit == pytest.approx(
        a["estimate_coarse_seconds"]
        + (run.iterations - n_exact + 3 * fills) * a["estimate_iteration_seconds"]
        + (n_exact + sweeps) * a["estimate_exact_iteration_seconds"])
    assert a["estimate_exact_iteration_seconds"] > a["estimate_iteration_seconds"]


def read_monitor(tmp_path, argv):
    """The monitor's errors (iterations × boundaries) of a run without fallback."""
    probe = tmp_path / "probe.h5"
    assert main(argv[:-1] + [str(probe)]) == 0
    return read_result(str(probe))[2]["monitor_costate_rel"]


def test_emulate_gives_the_threaded_run_and_says_so(tmp_path, capsys):
    argv = ["train", "--quiet", "--set", "model.layers=8", "--set", "coarse.iterations=20",
            "--set", "train.epochs=2", "--set", "monitor.every=8"]
    emulated, threaded = tmp_path / "e.h5", tmp_path / "t.h5"
    assert main(argv + ["--emulate", "3", "--out", str(emulated)]) == 0
    assert run_emulated(3, lambda comm: main(argv + ["--out", str(threaded)], comm=comm)) == [0] * 3
    attrs, pa, ha, _, _ = read_result(str(emulated))
    _, pb, hb, _, _ = read_result(str(threaded))
    assert attrs["ranks"] == 3 and attrs["emulated"]
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    summary = summarise(str(emulated))
    assert "3 emulated rank(s)" in summary and "exact-co-state monitor" in summary
    assert "predicted speed-up" in summary  # the cost model's critical path
    import matplotlib.image
    from pitmpi.plots import write_plots
    written = write_plots([str(emulated)], str(tmp_path / "fig"))
    monitor_png = str(tmp_path / "fig" / "monitor_e.png")
    assert monitor_png in written
    img = matplotlib.image.imread(monitor_png)
    assert img.shape[0] > 200 and np.ptp(img) > 0
    serial = tmp_path / "s.h5"
    assert main(argv[:-2] + ["--set", "train.method=serial", "--out", str(serial)]) == 0
    row = [line for line in compare([str(serial), str(emulated)]).splitlines()
           if line.startswith("e.h5")][0]
    assert "3 emulated" in row and " - " in row  # no speed-up for emulated ranks
    with h5py.File(serial) as f:
        assert not f.attrs["emulated"]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_emulate_needs_a_rank_count(tmp_path, capsys, n):
    out = tmp_path / "x.h5"
    assert main(["train", "--quiet", "--emulate", n, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--emulate {n} is not allowed" in err[0]
    assert not out.exists()


def test_critical_path_and_the_relay_in_the_partition():
    from pitmpi.model import ResNet
    from pitmpi.parallel.partition import MATMUL_RATE, critical_path, layer_costs, partition
    net = ResNet("verlet", 2, 16, 64, 2, T=5.0)
    cfg = config.load(None, [])
    costs = layer_costs(net, 32)
    bounds = partition(costs, 4, 2)
    est = critical_path(net, cfg, bounds, 600)
    rate = MATMUL_RATE["float64"] * 1e6
    blocks = [costs[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]
    assert est["serial_iteration"] == pytest.approx(costs.sum() * 32 / rate)
    assert est["iteration"] == pytest.approx(max(blocks) * 32 / rate)
    coarse = layer_costs(net.with_layers(32), 32).sum() * 32 / rate
    assert est["coarse"] == pytest.approx(600 * coarse)
    shared = critical_path(net, config.load(None, ["coarse.parallel=data-parallel"]), bounds, 600)
    # a quarter of each batch per rank (each call's fixed cost spread over fewer rows)
    assert shared["coarse"] == pytest.approx(
        600 * layer_costs(net.with_layers(32), 8).sum() * 8 / rate)
    assert shared["coarse"] < est["coarse"]
    # relayed co-states: the middle blocks sweep their layers twice, so get fewer
    relayed = partition(costs, 4, 2, middle_factor=1.0)
    widths = np.diff(relayed)
    assert widths[1] < widths[0] and widths[2] < widths[3]
    assert critical_path(net, cfg, relayed, 600, middle_factor=1.0)["iteration"] > est["iteration"]


@pytest.mark.parametrize("scheme, width, dtype", [("euler", 256, "float32"), ("verlet", 16, "float64")])
def test_the_relay_is_priced_as_a_forward_and_a_costate_only_adjoint(scheme, width, dtype):
    from pitmpi.model import ResNet
    from pitmpi.parallel.partition import layer_costs, ode_layer_cost
    from pitmpi.parallel.pit import relay_factor
    net = ResNet(scheme, 784, width, 16, 10, T=3.0, dtype=dtype)
    full, costate = ode_layer_cost(net, 128), ode_layer_cost(net, 128, grads=False)
    assert layer_costs(net, 128)[5] == full
    # one product of Euler's three (two of Verlet's six) and the batched
    # gradients' calls left out: more than two thirds of the layer, less than all
    assert 2 / 3 * full < costate < full
    cfg = config.load(None, ["train.batch_size=128", "regression.target=relayed",
                             "regression.relay_every=4"])
    assert relay_factor(cfg, net) == pytest.approx(costate / full / 4)
    assert relay_factor(config.load(None, []), net) == 0.0


def test_emulated_divergence_exits_with_its_code(tmp_path, capsys):
    out = tmp_path / "d.h5"
    # the last rank's batch loss is over the limit at once; rank 0 is stopped by its abort
    assert main(["train", "--quiet", "--emulate", "2", "--set", "model.layers=8",
                 "--set", "coarse.levels=1", "--set", "train.max_loss=0.01",
                 "--out", str(out)]) == 3
    assert "training diverged on rank 1" in capsys.readouterr().err
    assert not out.exists()


def test_three_levels_train_the_coarse_model_with_pit_on_the_same_blocks():
    """coarse.levels = 3: the fine run starts from the prolonged controls, the
    boundary's regression and the warm-up state of a pit run of the coarse
    network (two levels) on the fine blocks coarsened, and the cost model
    counts that run as its coarse phase."""
    from pitmpi.parallel.coarse import prolong
    from pitmpi.parallel.pit import PitTrainer
    size, layers, iterations = 2, 16, 2 * B
    cfg = config.load(None, QUICK + [f"model.layers={layers}", "coarse.levels=3",
                                     f"coarse.iterations={iterations}", "train.epochs=1"])

    def fine(comm):
        t = make_trainer(comm, cfg, SWISS)
        t.setup()
        return t, t.gather_params()

    fines = run_emulated(size, fine)
    bounds = fines[0][0].bounds
    assert bounds.tolist() == [0, 8, 16]  # on multiples of 2 ** 2
    ccfg = config.load(None, QUICK + [f"model.layers={layers // 2}", "coarse.levels=2",
                                      f"coarse.iterations={iterations}",
                                      f"train.epochs={iterations // B}", "train.schedule=constant"])

    def coarse_run(comm):  # on the fine blocks coarsened, not its own partition's
        t = PitTrainer(comm, ccfg, SWISS, bounds=bounds // 2)
        return t, t.run()

    out = run_emulated(size, coarse_run)
    coarse_trainers, coarse = [t for t, _ in out], out[0][1]
    expected = prolong(coarse.params, 2)
    for k, v in fines[0][1].items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    for a, b in zip(fines[0][0].reg.state(), coarse_trainers[0].reg.state()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    blk = coarse_trainers[0].net.block(0, int(bounds[1] // 2))
    warm = blk.forward(coarse_trainers[0].params, SWISS.x_train[
        coarse_trainers[0].batches.indices(-1)], store=False).output
    np.testing.assert_array_equal(fines[1][0].warm_state, warm)
    # the cost model's coarse phase: that run's iterations and its own coarse phase
    _, result = trained(size, [f"model.layers={layers}", "coarse.levels=3",
                               f"coarse.iterations={iterations}", "train.epochs=1"])
    assert result.attrs["estimate_coarse_seconds"] == pytest.approx(
        iterations * coarse.attrs["estimate_iteration_seconds"]
        + coarse.attrs["estimate_coarse_seconds"], rel=1e-12)



def test_output_errors_start_from_the_coarse_model_and_follow_the_last_block():
    """regression.output_errors: every block but the last holds each training
    sample's output error, first under the coarse model, then, after each
    epoch, the one the last block computed for the samples it trained on;
    the regression (and the monitor's prediction) reads [state, error]."""
    from pitmpi.kernels import cross_entropy, output_errors
    size = 3
    common = ["train.lr=1e-300", "train.momentum=0", "regression.output_errors=true"]
    cfg = config.load(None, QUICK + common + ["train.epochs=1"])
    started = run_emulated(size, lambda comm: (lambda t: (t.setup(), t)[1])(
        make_trainer(comm, cfg, SWISS)))
    trainers, result = trained(size, common + ["train.epochs=1", f"monitor.every={B}"])
    net, params = trainers[0].net, result.params
    # the controls do not move: the coarse ones are the fine ones at every other layer
    coarse_net = net.with_layers(net.layers // 2)
    coarse = {k: (v[::2] if k in ("K", "b") else v) for k, v in params.items()}
    whole = coarse_net.block(0, coarse_net.layers)
    ctx = whole.forward(coarse, SWISS.x_train, store=False)
    e_coarse = output_errors(cross_entropy(whole.scores(coarse, ctx), SWISS.y_train)[1],
                             SWISS.y_train)
    for t in started[:-1]:
        np.testing.assert_allclose(t.errors, e_coarse, rtol=1e-10, atol=1e-12)
    assert started[-1].errors is None
    # after the epoch: the fine net's errors for the batches the last block took
    fine_block = net.block(0, net.layers)
    ctx = fine_block.forward(params, SWISS.x_train, store=False)
    e_fine = output_errors(cross_entropy(fine_block.scores(params, ctx), SWISS.y_train)[1],
                           SWISS.y_train)
    seen = np.concatenate([trainers[0].batches.indices(g) for g in range(B - size + 1)])
    # (the warm-up batches -N+1..-1 reached the last block from coarse states)
    warm = np.concatenate([trainers[0].batches.indices(g) for g in range(1 - size, 0)])
    unseen = np.setdiff1d(np.arange(len(SWISS.y_train)), np.concatenate([seen, warm]))
    assert len(unseen) > 0
    for t in trainers[:-1]:
        np.testing.assert_allclose(t.errors[seen], e_fine[seen], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(t.errors[unseen], e_coarse[unseen], rtol=1e-10, atol=1e-12)
        assert t.reg.in_width == net.state_width + net.n_classes
    states, lams, _, y = exact_chain(trainers, B - 1)
    rows = trainers[0].batches.indices(B - 1)
    for r in range(size - 1):  # measured before the epoch's end: the coarse model's errors
        x = np.hstack([states[r], e_coarse[rows]])
        lam_hat = trainers[r].reg.predict(x, y)
        rel = np.linalg.norm(lam_hat - lams[r]) / np.linalg.norm(lams[r])
        np.testing.assert_allclose(result.history["monitor_costate_rel"][0, r], rel, rtol=1e-10)


@pytest.mark.parametrize("ranks, extra, applied, hinted", [
    (4, [], True, False),  # the [many_blocks] values: relayed co-states
    (4, ["regression.target=neighbour"], True, True),
    (2, [], False, False),
    (4, ["train.data_parallel_size=2"], False, False),  # two blocks of two replicas
])
def test_many_blocks_take_their_values_and_a_hint_without_relayed_costates(
        tmp_path, capsys, ranks, extra, applied, hinted):
    argv = ["train", "--set", "model.layers=8", "--set", "coarse.iterations=4",
            "--set", "train.epochs=1", "--emulate", str(ranks), "--out", str(tmp_path / "h.h5")]
    for item in extra:
        argv += ["--set", item]
    assert main(argv) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert ("the [many_blocks] values apply (regression.target = "
            f"'{'neighbour' if hinted else 'relayed'}', regression.relay_every = 4" in text) == applied
    assert ("hint: pit on 4 blocks" in text) == hinted
    assert ("docs/many-ranks.md" in text) == applied


@pytest.mark.parametrize("ranks", [4, 8])
def test_the_shipped_many_blocks_recipe_under_mpiexec_gives_the_emulated_iterates(tmp_path, ranks):
    """What `--emulate N` measures is what `mpirun -n N` trains: the Swiss
    roll's file as shipped, with its [many_blocks] values (relayed co-states
    every 4th batch, damping, four coarse levels, the coarse phase shared) on
    4 blocks, and on 8 ranks as 4 blocks x 2 replicas."""
    import os
    import subprocess
    import sys

    from .conftest import REPO, mpiexec
    argv = ["train", str(REPO / "run" / "swissroll.toml"), "--quiet", "--set", "train.epochs=2",
            "--set", "many_blocks.coarse.iterations=12", "--set", "monitor.every=8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI", "HYDRA", "PMIX"))}
    env["OMP_NUM_THREADS"] = "1"
    real, emulated = tmp_path / "mpi.h5", tmp_path / "emu.h5"
    r = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "pitmpi", *argv,
                        "--out", str(real)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert main(argv + ["--emulate", str(ranks), "--out", str(emulated)]) == 0
    (a_attrs, a_params, a_hist, a_timing, _), (e_attrs, e_params, e_hist, e_timing, _) = (
        read_result(str(real)), read_result(str(emulated)))
    assert a_attrs["blocks"] == e_attrs["blocks"] == 4 and not a_attrs["emulated"]
    for k in e_params:
        np.testing.assert_array_equal(a_params[k], e_params[k], err_msg=k)
    for k in ("loss", "val_acc", "monitor_costate_rel"):
        if k in e_hist:
            np.testing.assert_array_equal(a_hist[k], e_hist[k], err_msg=k)
    for k in ("rank_setup_traffic", "rank_iteration_traffic"):  # the same calls
        np.testing.assert_array_equal(a_timing[k], e_timing[k], err_msg=k)
