"""The LRA model: every attention trains, the exact ones agree with standard attention (padding included),
the position table grows on its grid, and the speedups combine as the paper's geometric mean."""
import math

import pytest
import torch

from repro.records import Row
from tasks.lra.model import ATTENTIONS, LRAClassifier, upsample_positions
from tasks.lra.train_lra import derived_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def model(attention, pair=False, seq_len=40):
    torch.manual_seed(0)
    return LRAClassifier(vocab=20, classes=3, seq_len=seq_len, dim=32, heads=2, depth=2, mlp_dim=32,
                         attention=attention, linformer_k=8, block_size=16, pair=pair).to(DEVICE)


def batch(pair=False, seq_len=40):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (3, seq_len), generator=gen)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, 25:] = False  # a padded sequence
    out = dict(input_ids=ids, real=real, labels=torch.tensor([0, 2, 1]))
    if pair:
        out.update(input_ids2=ids.flip(1), real2=real.flip(1))
    return {k: v.to(DEVICE) for k, v in out.items()}


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_gives_a_finite_loss_and_gradients(attention):
    m = model(attention, pair=True)
    out = m(**batch(pair=True))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_flash_matches_standard_attention_with_padding():
    ref, ours = model("standard").eval(), model("flash").eval()
    with torch.no_grad():
        a, b = ref(**batch()).logits, ours(**batch()).logits
    torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)


def test_position_table_grows_on_its_grid():
    m = model("standard", seq_len=16)  # a 4x4 image
    with torch.no_grad():
        ramp = torch.arange(4.0).repeat(4)  # each row of the image: 0, 1, 2, 3
        m.position.weight[:] = ramp[:, None]
    upsample_positions(m, 8)
    grown = m.position.weight[:, 0].reshape(8, 8)
    assert m.position.weight.shape == (64, 32)
    assert torch.allclose(grown[0], grown[5]) and (grown[0].diff() >= 0).all()  # still a left-to-right ramp
    with pytest.raises(ValueError, match="square"):
        upsample_positions(model("standard", seq_len=40), 8)


def test_speedups_and_their_geometric_mean():
    def tps(provider, task, value):
        return Row(provider, "step", 10, "tokens_per_s", "tokens/s", value, extra={"lra_task": task})
    rows = [tps("standard", "listops", 100.0), tps("flash", "listops", 200.0),
            tps("standard", "image", 100.0), tps("flash", "image", 800.0)]
    out = {(r.provider, r.metric, r.x_value): r.p50 for r in derived_rows(rows)}
    assert out[("flash", "speedup", "image")] == 8.0
    assert math.isclose(out[("flash", "speedup_geomean", 2)], 4.0)
    assert out[("standard", "speedup_geomean", 2)] == 1.0


def test_pathx_recipe_pretrains_on_path64_and_grows_the_positions(tmp_path):
    from conftest import run_repro
    out = run_repro("task=pathx", "logger=none", f"hydra.run.dir={tmp_path}", f"paths.outputs={tmp_path}/o",
                    "lra.pretrain={task: path64, steps: 1}")
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    rows = json.loads((tmp_path / "record.json").read_text())["rows"]
    stages = {r["extra"]["lra_task"] for r in rows if r["metric"] == "val_accuracy"}
    assert stages == {"path64", "pathx"}


def test_a_step_is_split_into_micro_batches_without_changing_its_examples(compose, tmp_path):
    from repro.context import RunContext
    from tasks.lra.train_lra import candidates

    def first_step(micro):
        cfg = compose("task=lra_retrieval", "lra.attention=[standard]", "lra.batch=4", "train.grad_accum=2",
                      f"lra.micro_batch.retrieval={micro}", f"paths.cache={tmp_path}")
        ctx = RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {})
        (candidate,) = candidates(cfg, ctx, tmp_path, ["retrieval"])
        trainee = candidate.build()
        return trainee.batches(0, 0, 1), trainee.tokens_per_step

    whole, tokens = first_step("null")
    split, split_tokens = first_step(2)
    assert [len(b["labels"]) for b in whole] == [4, 4] and [len(b["labels"]) for b in split] == [2, 2, 2, 2]
    assert torch.equal(torch.cat([b["input_ids2"] for b in split]), torch.cat([b["input_ids2"] for b in whole]))
    assert tokens == split_tokens == 8 * 2 * whole[0]["input_ids"].shape[1]  # 8 pairs, two documents each
