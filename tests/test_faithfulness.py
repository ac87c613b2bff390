"""Task generators produce the evidence they claim; metrics give known values on hand-made cases."""

import torch

from implicit_hooks.faithfulness import area, evidence_auroc, perturbation_curve, topk_precision
from implicit_hooks.faithfulness import tasks as T


def test_markers_evidence_is_the_markers_of_the_labelled_polarity():
    b = T.markers(50, length=20, n_markers=3, seed=1)
    assert b.ids.shape == (50, 20) and torch.all(b.ids[:, -1] == T.QUERY)
    assert torch.all(b.evidence.sum(-1) == 3) and not b.evidence[:, -1].any()
    for ids, ev, label in zip(b.ids, b.evidence, b.label):
        pool = T.POS_MARKERS if label == T.POSITIVE else T.NEG_MARKERS
        assert all(int(t) in pool for t in ids[ev])
        assert all(int(t) in T.DISTRACTORS for t in ids[~ev][:-1])
    assert {int(x) for x in b.label} == {T.POSITIVE, T.NEGATIVE}


def test_recall_evidence_is_the_queried_pair():
    b = T.recall(40, pairs=5, seed=2)
    assert b.ids.shape == (40, 13)
    for ids, ev, q, label in zip(b.ids, b.evidence, b.question, b.label):
        key, value = ids[ev].tolist()
        assert key == int(ids[0]) and value == int(label) and value in T.VALUES
        keys = ids[2:12:2].tolist()
        assert len(set(keys)) == 5 and 2 + keys.index(key) * 2 == int(ev.nonzero()[0])
        assert q.nonzero().flatten().tolist() == [0, 12] and not (q & ev).any()


def test_patches_evidence_is_one_two_by_two_object_of_the_label_type():
    b = T.patches(30, grid=(5, 7), seed=3)
    assert b.ids.shape == (30, 36)
    for ids, ev, label in zip(b.ids, b.evidence, b.label):
        cells = ev[:-1].nonzero().flatten()
        rows, cols = cells // 7, cells % 7
        assert len(cells) == 4 and rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1
        assert torch.all(ids[cells] == label) and int(label) in T.OBJECT_TYPES
        assert not torch.isin(ids[~ev][:-1], torch.tensor(T.OBJECT_TYPES)).any()


def test_rankings_perfect_reversed_and_tied():
    evidence = torch.tensor([[True, False, True, False, False]] * 3)
    perfect = torch.tensor([[5.0, 1, 4, 2, 0]])
    reversed_ = -perfect
    tied = torch.zeros(1, 5)
    r = torch.cat([perfect, reversed_, tied])
    torch.testing.assert_close(evidence_auroc(r, evidence), torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(topk_precision(r[:2], evidence[:2]), torch.tensor([1.0, 0.0]))
    # candidates exclude positions from the ranking
    cand = torch.tensor([[True, True, True, True, False]])
    torch.testing.assert_close(evidence_auroc(-perfect, evidence[:1], cand), torch.tensor([0.0]))


def test_perturbation_curves_of_a_model_that_reads_only_the_evidence():
    """A 'model' that is right iff any evidence token survives: removing evidence first kills it."""
    L = 10
    ids = torch.arange(1, L + 1).repeat(4, 1)
    evidence = torch.zeros(4, L, dtype=torch.bool)
    evidence[:, [3, 7]] = True
    label = torch.ones(4, dtype=torch.long)

    def predict(x):
        alive = ((x == 4) | (x == 8)).any(-1)
        return torch.stack([(~alive).float() * 10, alive.float() * 10], -1)

    cand = torch.ones(4, L, dtype=torch.bool)
    perfect = evidence.float()
    _, morf = perturbation_curve(predict, ids, label, perfect, cand, order="morf", replace=0)
    _, lerf = perturbation_curve(predict, ids, label, perfect, cand, order="lerf", replace=0)
    # 10 candidates: 10 % removes 1 (one evidence token left), 20 % removes both → wrong from then on
    assert morf[:, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert lerf[:, 0].tolist() == [1] * 9 + [1]  # LeRF removes the 8 others before any evidence
    x = torch.tensor([i / 10 for i in range(10)])
    expected_morf = float(torch.trapezoid(morf[:, 0], x) / 0.9)
    torch.testing.assert_close(area(morf)[0], torch.tensor(expected_morf))
    assert float(area(lerf)[0] - area(morf)[0]) > 0.7  # ΔA^F of a perfect explanation


def test_shipped_models_load_and_reach_their_reported_accuracy():
    from implicit_hooks.faithfulness import models

    shipped = models.available()
    assert ("mamba", "markers") in shipped
    for family, task in shipped:
        meta = models.metadata(family, task)
        model = models.load(family, task)
        batch = T.TASKS[task](meta["held_out_n"], seed=meta["held_out_seed"], **meta["task_options"])
        with torch.no_grad():
            acc = float((model(batch.ids).logits[:, -1].argmax(-1) == batch.label).float().mean())
        assert abs(acc - meta["held_out_accuracy"]) < 1e-6, (family, task)
        assert acc > 0.9, (family, task, acc)


def test_benchmark_pipeline_end_to_end_on_a_small_subset(tmp_path):
    from implicit_hooks.faithfulness import benchmark

    methods = ["random", "MambaLRP-style grad × input", "rollout (full)", "attribution (S6 only)"]
    results = benchmark.run([("mamba", "markers")], n=4, methods=methods, show_progress=False)
    res = results["mamba/markers"]
    assert list(res["methods"]) == methods
    for m in res["methods"].values():
        assert 0 <= m["evidence AUROC"]["mean"] <= 1 and m["evidence AUROC"]["n"] == 4
        assert len(m["curves"]["morf"]["prob"]) == 10
    folder = benchmark.write(results, tmp_path)
    assert "| rollout (full) |" in (folder / "faithfulness_table.md").read_text()
    assert (folder / "faithfulness_curves.png").stat().st_size > 0


def test_mamba_lrp_forward_keeps_the_models_values():
    from implicit_hooks.faithfulness import models
    from implicit_hooks.faithfulness.baselines import lrp_forward

    model = models.load("mamba", "markers")
    ids = T.markers(3, seed=9).ids
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        torch.testing.assert_close(
            lrp_forward(model, embeds), model(inputs_embeds=embeds).logits, rtol=1e-4, atol=1e-5
        )
