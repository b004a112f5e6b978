"""Training pipeline (specee.train, specee.collect, specee.calibrate): calibration's finite-sample promise,
layer selection, the schedule's training pairs, the decode simulation, and a tiny end-to-end
`specee train` on a random model."""
import math

import pytest
import torch

import specee
from conftest import make_tiny
from specee.predictors import compare_banks, load_predictors
from specee.calibrate import binom_cdf, ltt_select, precision_lower_bound, simulate, thresholds_for_precision
from specee.collect import split_sequences
from specee.train import TrainConfig, parse_prompt_spec, schedule_pairs, select_layers, train_bank


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_binomial_tail_and_bound_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for x, n, p in [(0, 10, 0.1), (3, 50, 0.02), (40, 2000, 0.02), (7, 7, 0.5), (12, 300, 0.05)]:
        assert math.isclose(binom_cdf(x, n, p), stats.binom.cdf(x, n, p), rel_tol=1e-9, abs_tol=1e-12)
    for e, n, d in [(0, 100, 0.1), (5, 400, 0.05), (30, 1000, 0.1)]:
        cp = 1 - stats.beta.ppf(1 - d, e + 1, n - e)  # one-sided Clopper-Pearson on the error rate
        assert math.isclose(precision_lower_bound(e, n, d), cp, abs_tol=1e-7)


def _synthetic(n, g):
    """Scores in (0, 1) with P(correct | score) = 1 - 0.3 (1 - score)^2: precision above t rises with t."""
    s = torch.rand(n, generator=g)
    return s, torch.rand(n, generator=g) < 1 - 0.3 * (1 - s) ** 2


def _true_precision(t):
    # E[1 - 0.3 (1 - s)^2 | s > t] for s ~ U(0, 1)
    return 1 - 0.1 * (1 - t) ** 2


@pytest.mark.parametrize("target", [0.95, 0.98])
def test_calibration_meets_its_promise_on_synthetic_scores(target):
    """Over repeated calibration sets, the chosen threshold's true precision falls below the target at most
    delta of the time, and the choice is not vacuous; a naive empirical choice fails far more often."""
    delta, trials, n = 0.1, 150, 2000
    grid = [1 - i / 200 for i in range(1, 200)]  # conservative -> aggressive
    # members expected to have too few exits to ever pass are skipped, decided without the data
    n_min = math.log(delta) / math.log(target)
    g = torch.Generator().manual_seed(0)
    fails = naive_fails = 0
    exit_rates = []
    for _ in range(trials):
        s, ok = _synthetic(n, g)
        cands = []
        for t in grid:
            m = s > t
            cands.append((int(m.sum()), int((m & ~ok).sum())) if n * (1 - t) >= 5 * n_min else None)
        j = ltt_select(cands, target, delta)
        t_ltt = grid[j] if j >= 0 else 1.0
        fails += _true_precision(t_ltt) < target
        exit_rates.append(1 - t_ltt)
        t_naive = thresholds_for_precision(s, torch.ones(n, dtype=torch.bool), ok, target, min_exits=1)
        naive_fails += _true_precision(t_naive) < target
    # delta up to the Monte-Carlo error of 150 trials (sd 0.024); seeded, so deterministic
    assert fails / trials <= delta + 0.03, f"LTT broke its promise in {fails}/{trials} calibrations"
    best = 1 - min(t for t in grid if _true_precision(t) >= target)  # the exit rate an oracle would pick
    assert sum(exit_rates) / trials > 0.6 * best, "the calibrated threshold should still let tokens exit"
    assert naive_fails > 2 * fails + 10, "the finite-sample bound is what keeps the promise"


def test_ltt_stops_at_the_first_failure_and_skips_members_that_cannot_exit():
    # (exits, errors): the third member fails, so the fourth (which would pass alone) is never reached
    cands = [None, (500, 0), (500, 40), (5000, 10)]
    assert ltt_select(cands, 0.98, 0.1) == 1
    assert ltt_select([(10, 5)], 0.98, 0.1) == -1


def test_thresholds_for_precision_cuts_between_distinct_scores():
    s = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    ok = torch.tensor([True, True, True, False, True, False])
    conf = torch.ones(6, dtype=torch.bool)
    assert thresholds_for_precision(s, conf, ok, 1.0, min_exits=1) == pytest.approx(0.7)
    assert thresholds_for_precision(s, conf, ok, 0.75, min_exits=1) == pytest.approx(0.5)
    assert thresholds_for_precision(s, conf, ok, 1.0, min_exits=4) == 1.0
    # tokens that cannot be confirmed do not count
    conf2 = torch.tensor([True, True, True, False, True, True])
    assert thresholds_for_precision(s, conf2, ok, 1.0, min_exits=1) == pytest.approx(0.5)


def test_layer_selection_follows_the_oracle_distribution():
    oracle = torch.tensor([2] * 1 + [10] * 30 + [12] * 50 + [15] * 5 + [20] * 40 + [29] * 20)
    layers, always, hist = select_layers(oracle, 30, num_always=3)
    assert layers == list(range(10, 29)), "from the 2nd percentile of the oracle exits to the second-to-last layer"
    assert always == [10, 12, 20]
    layers, _, _ = select_layers(oracle, 30, first_layer=3, num_always=2, min_layer=5)
    assert layers[0] == 5 and int(hist[12]) == 50
    agree = torch.linspace(0, 1, 30)  # fraction of tokens whose layer-l argmax is already the final one
    layers, _, _ = select_layers(oracle, 30, num_always=2, agree=agree, min_agree=0.3)
    assert layers[0] == 9, "from the first layer agreeing with the final argmax on 30% of tokens"


def test_cli_train_arguments():
    from specee.cli import build_parser

    args = build_parser().parse_args(["train", "--prompts", "a.jsonl[0::2]", "b.jsonl", "--out", "x",
                                      "--target-precision", "0.95", "--draft", "hybrid"])
    assert args.prompts == ["a.jsonl[0::2]", "b.jsonl"] and args.target_precision == 0.95 and args.k == 4
    assert args.check is None and args.check_atol == 0.0
    args = build_parser().parse_args(["train", "--prompts", "a.jsonl", "--out", "x", "--check", "shipped",
                                      "--check-atol", "1e-6"])
    assert args.check == "shipped" and args.check_atol == 1e-6


def _hand_data(final, argmax, cands, seq):
    N, L = argmax.shape
    k = cands.shape[1]
    # candidate logits: 5 for the layer's argmax when it is a candidate, else 0
    cl = (cands[:, None, :] == argmax[:, :, None]).float() * 5.0
    return dict(final=final, argmax=argmax.int(), cands=cands, cand_logits=cl,
                seq=torch.tensor(seq, dtype=torch.int32), pos=torch.arange(N, dtype=torch.int32))


def test_schedule_pairs_are_the_layers_evaluated_together():
    L = 8
    final = torch.tensor([5, 5, 5])
    argmax = torch.tensor([[1] * 3 + [5] * 5, [1] * 6 + [5] * 2, [1] * 2 + [5] * 6])  # oracle exits 3, 6, 2
    data = _hand_data(final, argmax, torch.tensor([[5, 6, 7, 8]] * 3), [0, 0, 0])
    pairs = schedule_pairs(data, list(range(2, 7)), [4], window=5, offsets=(-2, 0, 2)).tolist()
    assert pairs[0] == [0, 4, -1], "token 0: no history, only the always-on layer, nothing before it"
    assert [p[1:] for p in pairs if p[0] == 1] == [[3, -1], [4, 3], [5, 4]], "around the previous exit 3 (1,3,5)"
    assert [p[1:] for p in pairs if p[0] == 2] == [[3, -1], [4, 3], [5, 4], [6, 5]]


def test_simulation_exits_at_the_first_confirmed_firing_layer_and_prices_it():
    L = 6
    final = torch.tensor([5, 5])
    argmax = torch.tensor([[1, 2, 5, 5, 5, 5], [1, 2, 3, 4, 4, 5]])
    data = _hand_data(final, argmax, torch.tensor([[5, 6, 7, 8], [4, 9, 9, 9]]), [0, 1])
    layers = [1, 2, 3, 4]
    scores = torch.zeros(2, 4, 5)
    scores[0, 1] = 0.9  # token 0 fires at layer 2: confirmed, correct
    scores[1, 2:] = 0.9  # token 1 fires at layer 3 (argmax 4 is a candidate, but wrong) and 4
    costs = dict(head=4.0, predictor=0.1)
    sim = simulate(data, layers, layers, scores, {l: 0.5 for l in layers}, 0, (0,), "logits", costs)
    assert sim["exit"].tolist() == [2, 3] and sim["correct"].tolist() == [True, False]
    assert sim["evals"] == 2 + 3 and sim["fires"] == 2
    assert sim["cost"] == pytest.approx(((3 + 4) + 5 * 0.1 + 2 * 4.0) / 2)
    assert sim["speedup"] == pytest.approx((L + 4.0) / sim["cost"])
    sim = simulate(data, layers, layers, scores, {l: 1.0 for l in layers}, 0, (0,), "logits", costs)
    assert not sim["exited"].any() and sim["cost"] == pytest.approx(L + 4 * 0.1 + 4.0)


def test_measured_costs_price_an_evaluation_as_the_engine_runs_it():
    """measure_costs' predictor cost comes from decoding with a bank that evaluates every layer from the middle and
    never fires (the probe checks its own evaluation count), beside the op alone; all in layer units."""
    from specee.calibrate import measure_costs
    from specee.drafts import NGramSource

    costs = measure_costs(make_tiny("llama", num_hidden_layers=6), NGramSource(4), repeats=3, tokens=4)
    assert {"layer_ms", "step_ms", "head", "predictor", "predictor_kernel", "draft"} <= set(costs)
    assert all(math.isfinite(v) and v >= 0 for v in costs.values())
    assert costs["layer_ms"] > 0 and costs["predictor_kernel"] > 0


def test_prompt_specs_and_splits():
    assert parse_prompt_spec("a/b.jsonl") == ("a/b.jsonl", slice(None))
    assert parse_prompt_spec("x.jsonl[0::2]") == ("x.jsonl", slice(0, None, 2))
    assert parse_prompt_spec("x.jsonl[:150]") == ("x.jsonl", slice(None, 150, None))
    sp = split_sequences(50, (0.7, 0.1, 0.2), seed=3)
    assert sorted(sp["train"] + sp["val"] + sp["calib"]) == list(range(50))
    assert (len(sp["train"]), len(sp["val"]), len(sp["calib"])) == (35, 5, 10)
    assert sp == split_sequences(50, (0.7, 0.1, 0.2), seed=3)


def test_tiny_end_to_end_train_is_deterministic_and_resumable(tmp_path, monkeypatch):
    model = make_tiny("llama", num_hidden_layers=6)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 211, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(24)]
    cfg = TrainConfig(max_new_tokens=20, chunk_prompts=8, vocab=64, epochs=4, hidden=16, target_precision=0.6,
                      head_cost=4.0, predictor_cost=0.05)
    bank = train_bank(model, None, prompts, tmp_path / "a", cfg, work=tmp_path / "work", log=lambda s: None)
    assert (tmp_path / "a" / "predictors.json").exists() and (tmp_path / "a" / "predictors.safetensors").exists()
    m = bank.metrics
    assert set(m["draft_recall"]) == {"train", "val", "calib"} and sum(m["oracle_histogram"]) > 0
    assert set(bank.operating_points) >= {"0.9", "0.95", "0.98", "0.99", "0.6"}

    # deterministic with a seed: a second run from scratch (its own collection) gives the same bank, bit for bit
    fresh = train_bank(model, None, prompts, tmp_path / "b", cfg, work=tmp_path / "work2", log=lambda s: None)
    assert compare_banks(tmp_path / "a", tmp_path / "b") == []
    assert fresh.thresholds == bank.thresholds and fresh.always == bank.always
    for l in bank.predictor_layers:
        assert all(torch.equal(x, y) for x, y in zip(bank.weights[l], fresh.weights[l]))

    # resumable: a run over a filled work directory reuses every chunk (no generation at all): same bank
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("re-generated a cached chunk"))
    train_bank(model, None, prompts, tmp_path / "c", cfg, work=tmp_path / "work", log=lambda s: None)
    assert compare_banks(tmp_path / "a", tmp_path / "c") == []
    monkeypatch.undo()

    loaded = load_predictors(tmp_path / "a", model)
    ids = torch.tensor([prompts[0]])
    out = specee.generate(model, ids, mode="early_exit", exit_config={"predictor": loaded}, max_new_tokens=16,
                          do_sample=False, return_dict_in_generate=True)
    assert out.exit_layers.shape == (1, 16) and loaded.stats["evaluations"] > 0
    loaded.detach()
