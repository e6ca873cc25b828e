"""The LRA model: every attention trains, the exact ones agree with standard attention (padding included),
the position table grows on its grid, and the speedups combine as the paper's geometric mean."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ATTENTION_TOL, rel_err
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
    assert torch.isfinite(out.loss)
    for name, p in m.named_parameters():  # every weight, the attention's own included, is trained
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_padding_changes_no_prediction(attention):
    m = model(attention).eval()
    inputs = batch()
    other = dict(inputs, input_ids=inputs["input_ids"].masked_fill(~inputs["real"], 7))  # other padded tokens
    with torch.no_grad():
        a, b = m(**inputs).logits, m(**other).logits
    assert not torch.equal(other["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_byte_pixels_without_a_mask_are_int64_tokens_all_real():
    m = model("standard").eval()
    pixels = torch.randint(0, 20, (3, 40), dtype=torch.uint8, device=DEVICE)  # the test model's 20 tokens
    labels = torch.tensor([0, 2, 1], device=DEVICE)
    with torch.no_grad():
        as_bytes = m(input_ids=pixels, labels=labels).logits
        as_tokens = m(input_ids=pixels.long(), real=torch.ones(3, 40, dtype=torch.bool, device=DEVICE),
                      labels=labels).logits
    torch.testing.assert_close(as_bytes, as_tokens)


@pytest.mark.parametrize("attention", ["standard", "linformer"])
def test_a_forward_reads_nothing_back_from_the_device(attention):
    """No host read (.item(), bool()) inside a step: each is a device sync. A mask given is passed on as it is,
    an all-true one too; None, the batches' word for no padding, takes the path without a mask."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default  # under .item(), bool(), int()
            return func(*args, **(kwargs or {}))

    m = model(attention, pair=True)
    given = []
    m.blocks[0].attn.attend.register_forward_pre_hook(lambda _, args: given.append(args[3]))
    inputs = batch(pair=True)
    full = dict(inputs, real=torch.ones_like(inputs["real"]))
    without = {k: v for k, v in inputs.items() if k not in ("real", "real2")}
    for example in (inputs, full, without):
        with HostReads() as reads:
            m(**example).loss.backward()
        assert reads.count == 0
    assert given[2] is full["real"] and given[4] is given[5] is None  # two documents a pair


def test_flash_matches_standard_attention_with_padding():
    """Each real token's output of the last block, before pooling, with the q, k and v projections doubled for
    more peaked attention: the pooled logits (near 0.2, at atol 2e-3) let a softmax scale 1.25x too large pass
    (6e-4 apart)."""
    inputs, tokens = batch(), {}
    for attention in ("standard", "effrepro"):
        m = model(attention).eval()
        m.norm.register_forward_hook(lambda _, args, out, attention=attention: tokens.__setitem__(attention, out))
        with torch.no_grad():
            for block in m.blocks:
                block.attn.qkv.weight.mul_(2.0)
            m(**inputs)
    real = inputs["real"]
    # measured on a CPU: 1e-7, and 1e-2 at a softmax scale 1.05x
    assert rel_err(tokens["effrepro"][real], tokens["standard"][real].double()) < ATTENTION_TOL[torch.float32]


def test_block_sparse_attention_is_standard_attention_under_the_butterfly_mask():
    """Three blocks of 16 over 40 tokens: query block 1 skips key block 2 and 2 skips 1 (a dense kernel would not),
    and the last block is cut short, with padding in it."""
    from effrepro_kernels import attention_reference, block_mask_to_dense

    attend = ATTENTIONS["effrepro_sparse"](seq_len=40, block_size=16).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, 2, 40, 16, generator=gen).to(DEVICE) for _ in range(3))
    real = batch()["real"]
    allowed = block_mask_to_dense(attend.block_mask, 40, 40, 16)
    assert not allowed.all()
    expected = attention_reference(q, k, v, key_padding_mask=real, attn_mask=allowed)
    torch.testing.assert_close(attend(q, k, v, real), expected, rtol=2e-3, atol=2e-3)

def test_linformer_with_identity_projections_matches_standard_attention_with_padding():
    ref = model("standard").eval()
    torch.manual_seed(0)
    ours = LRAClassifier(vocab=20, classes=3, seq_len=40, dim=32, heads=2, depth=2, mlp_dim=32,
                         attention="linformer", linformer_k=40).to(DEVICE).eval()
    missing = ours.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"blocks.{i}.attn.attend.{p}" for i in range(2) for p in "ef")
    with torch.no_grad():
        for block in ours.blocks:
            block.attn.attend.e.copy_(torch.eye(40))
            block.attn.attend.f.copy_(torch.eye(40))
        torch.testing.assert_close(ours(**batch()).logits, ref(**batch()).logits, rtol=1e-5, atol=1e-5)


def test_an_unknown_attention_is_an_error():
    with pytest.raises(ValueError, match="attention='performer' is not one of"):
        model("performer")


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


def test_model_flops_count_each_attention_by_what_it_computes():
    from repro.train import model_flops_per_token

    # by hand: 2 layers of width 8 over 40 tokens; Linformer's k = 4, butterfly blocks of 16
    layer = 8 * 24 + 24 + 8 * 8 + 8 + 2 * 2 * 8 + 8 * 16 + 16 + 16 * 8 + 8  # qkv, out, 2 norms, mlp
    # the final norm, and the head shared among an example's 40 tokens; not E and F, not the embeddings
    weights = 2 * layer + 2 * 8 + (8 * 16 + 16 + 16 * 3 + 3) / 40
    # three blocks of 16, 16 and 8 rows; the butterfly keeps (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 2)
    pairs = 4 * 16 * 16 + 2 * 16 * 8 + 8 * 8
    per_layer = {"standard": 12 * 8 * 40, "effrepro": 12 * 8 * 40, "effrepro_sparse": 12 * 8 * pairs / 40,
                 "linformer": 24 * 8 * 4}  # Linformer: E·K, F·V, QKᵀ and PV over 4 rows, 2·4·8 forward each
    assert set(per_layer) == set(ATTENTIONS)
    for attention, flops in per_layer.items():
        m = LRAClassifier(vocab=20, classes=3, seq_len=40, dim=8, heads=2, depth=2, mlp_dim=16, attention=attention,
                          linformer_k=4, block_size=16)
        assert model_flops_per_token(m, layers=2, width=8, seq_len=40) == pytest.approx(6 * weights + 2 * flops)


@pytest.mark.parametrize("attention", ["standard", "linformer"])
def test_attention_flops_are_its_matrix_products(attention):
    """Against PyTorch's count of a forward and backward (SDPA in its math form, which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    module = model(attention).blocks[0].attn.attend.cpu()
    q, k, v = (torch.randn(3, 2, 40, 16, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counted:
        module(q, k, v, None).sum().backward()
    assert counted.get_total_flops() / (3 * 40) == module.flops_per_token(2 * 16, 40)


@pytest.mark.parametrize("pair", [False, True])
def test_model_flops_are_the_matrix_products_of_a_training_step(pair):
    """Against PyTorch's count of a forward and backward of the whole model, per token as tokens/s counts them
    (both of Retrieval's documents): the head runs once an example, not once a token. Only the biases and the
    norms' weights (added or scaled, not multiplied) set the two apart."""
    from torch.utils.flop_counter import FlopCounterMode

    from repro.train import model_flops_per_token
    m, data = model("standard", pair=pair).cpu(), {k: v.cpu() for k, v in batch(pair=pair).items()}
    with FlopCounterMode(display=False) as counted:
        m(**data).loss.backward()
    towers = 2 if pair else 1
    tokens = data["input_ids"].numel() * towers
    vectors = sum(p.numel() for p in m.parameters() if p.dim() == 1)
    head_vectors = sum(p.numel() for p in m.head.parameters() if p.dim() == 1)
    vectors_per_token = vectors - head_vectors + head_vectors / (towers * 40)
    per_token = model_flops_per_token(m, layers=2, width=32, seq_len=40)
    assert counted.get_total_flops() / tokens == pytest.approx(per_token - 6 * vectors_per_token)


def test_speedups_and_their_geometric_mean():
    def tps(provider, task, value):
        return Row(provider, "step", 10, "tokens_per_s", "tokens/s", value, extra={"lra_task": task})
    rows = [tps("standard", "listops", 100.0), tps("effrepro", "listops", 200.0),
            tps("standard", "image", 100.0), tps("effrepro", "image", 800.0)]
    rows += [tps("standard", "path64", 100.0), tps("effrepro", "path64", 300.0)]  # a pre-training stage's
    out = {(r.provider, r.metric, r.x_value): r.p50 for r in derived_rows(rows, ["listops", "image"])}
    assert ("effrepro", "speedup", "path64") not in out
    assert out[("effrepro", "speedup", "image")] == 8.0
    assert math.isclose(out[("effrepro", "speedup_geomean", 2)], 4.0)
    assert out[("standard", "speedup_geomean", 2)] == 1.0


def test_accuracy_average_takes_the_test_split_where_a_task_has_one():
    def accuracy(split, task, value, data):
        return Row("effrepro", "step", 10, f"{split}_accuracy", "%", value, extra={"lra_task": task, "data": data})
    rows = [accuracy("val", "listops", 40.0, "generated"), accuracy("test", "listops", 30.0, "generated"),
            accuracy("val", "text", 60.0, "fixture")]
    rows += [Row("effrepro", "step", 10, "tokens_per_s", "tokens/s", 1.0, extra={"lra_task": t})
             for t in ("listops", "text")]
    (average,) = [r for r in derived_rows(rows, ["listops", "text"]) if r.metric == "accuracy_avg"]
    assert average.p50 == 45.0  # listops' test, text's val (its val set is IMDb's test set)
    assert average.extra["fixture_tasks"] == "text"  # random labels: the average says so



def test_accuracy_average_leaves_out_a_trainee_that_stopped_after_an_evaluation():
    """One out of memory at step 600 had evaluated at step 500: that accuracy is not the final model's."""
    def accuracy(provider, task, step, value):
        return Row(provider, "step", step, "test_accuracy", "%", value, extra={"lra_task": task, "data": "generated"})

    def tps(provider, task):
        return Row(provider, "step", 1000, "tokens_per_s", "tokens/s", 1.0, extra={"lra_task": task})
    rows = [accuracy(p, t, 1000, 40.0) for p in ("standard", "effrepro") for t in ("listops", "pathfinder")]
    rows = [r for r in rows if (r.provider, r.extra["lra_task"]) != ("effrepro", "pathfinder")]
    rows += [tps(p, t) for p, t in (("standard", "listops"), ("standard", "pathfinder"), ("effrepro", "listops"))]
    rows += [accuracy("effrepro", "pathfinder", 500, 90.0),
             Row("effrepro", "step", 0, "loss", "nats", status="oom", extra={"lra_task": "pathfinder"})]
    averages = {r.provider: r.p50 for r in derived_rows(rows, ["listops", "pathfinder"]) if r.metric == "accuracy_avg"}
    assert averages == {"standard": 40.0}

@pytest.mark.parametrize("task, source, splits", [("lra_listops", "fixture", ["val_accuracy", "test_accuracy"]),
                                                  ("lra_image", "fixture", ["val_accuracy", "test_accuracy"]),
                                                  ("lra_text", "hub", ["val_accuracy"])])
def test_the_model_is_evaluated_on_val_and_on_a_distinct_test_split(compose, tmp_path, monkeypatch, task, source,
                                                                    splits):
    from repro.context import RunContext
    from tasks.lra import train_lra

    loaded = []
    real_load = train_lra.load_split

    def load_split(name, split, n, spec, cache):  # the hub's data stands in as fixtures (no download here)
        loaded.append(split)
        return real_load(name, split, n, OmegaConf.merge(spec, {"source": "fixture"}), cache)

    monkeypatch.setattr(train_lra, "load_split", load_split)
    cfg = compose(f"task={task}", "lra.attention=[standard]", f"lra.source={source}", f"paths.cache={tmp_path}")
    (candidate,) = train_lra.candidates(cfg, RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {}), tmp_path)
    trainee = candidate.build()
    rows = trainee.evaluate(trainee.model.eval())
    assert [r.metric for r in rows] == splits and loaded == ["train", *(s.split("_")[0] for s in splits)]
    assert all(r.extra["examples"] == cfg.lra.n_val for r in rows)
    for r in rows:  # by hand: the share of the split's examples whose highest logit is their label
        examples, _, _ = real_load(task.removeprefix("lra_"), r.metric.split("_")[0], cfg.lra.n_val,
                                   OmegaConf.merge(cfg.lra, {"source": "fixture"}), tmp_path)
        with torch.no_grad():
            predicted = trainee.model(**examples).logits.argmax(-1)
        assert r.p50 == pytest.approx(100 * (predicted == examples["labels"]).double().mean().item())
    assert trainee.extra["data"] == ("generated" if task == "lra_listops" else source)
    if len(splits) == 2:  # two different sets of examples, not one scored twice
        val, test = (real_load(task.removeprefix("lra_"), split, cfg.lra.n_val, cfg.lra, tmp_path)[0]
                     for split in ("val", "test"))
        assert not torch.equal(val["input_ids"], test["input_ids"])


def test_pathx_recipe_starts_from_the_pretrained_model_with_its_positions_grown(compose, tmp_path):
    from repro.context import RunContext
    from tasks.lra.train_lra import candidates

    cfg = compose("task=pathx", "lra.attention=[standard]", "lra.pretrain={task: path64, steps: 1}",
                  f"paths.cache={tmp_path}")
    ctx = RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {})
    (candidate,) = candidates(cfg, ctx, tmp_path)
    assert candidate.spec.steps == 1 and len(candidate.then) == 1
    pretrained = candidate.build()
    assert pretrained.extra["lra_task"] == "path64" and pretrained.model.position.weight.shape[0] == 64 * 64
    with torch.no_grad():  # stands for the pre-training: weights the fresh Path-X model cannot have by chance
        for p in pretrained.model.parameters():
            p.add_(torch.randn_like(p))
    trained = {k: v.clone() for k, v in pretrained.model.state_dict().items()}
    grown = candidate.then[0].build(pretrained)
    assert grown.extra["lra_task"] == "pathx"
    state = grown.model.state_dict()
    assert state["position.weight"].shape[0] == 128 * 128
    for name, value in trained.items():
        if name != "position.weight":
            assert torch.equal(state[name], value), name
    side = torch.nn.functional.interpolate(trained["position.weight"].T.reshape(1, -1, 64, 64), size=(128, 128),
                                           mode="bilinear", align_corners=False)
    torch.testing.assert_close(state["position.weight"], side.reshape(trained["position.weight"].shape[1], -1).T)


def test_a_step_is_split_into_micro_batches_without_changing_its_examples(compose, tmp_path):
    from repro.context import RunContext
    from tasks.lra.train_lra import candidates

    def first_step(micro):
        cfg = compose("task=lra_retrieval", "lra.attention=[standard]", "lra.batch=4", "train.grad_accum=2",
                      f"lra.micro_batch.retrieval={micro}", f"paths.cache={tmp_path}")
        ctx = RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {})
        (candidate,) = candidates(cfg, ctx, tmp_path)
        trainee = candidate.build()
        return trainee.batches(0, 0, 1), trainee.tokens_per_step

    whole, tokens = first_step("null")
    split, split_tokens = first_step(2)
    assert [len(b["labels"]) for b in whole] == [4, 4] and [len(b["labels"]) for b in split] == [2, 2, 2, 2]
    assert torch.equal(torch.cat([b["input_ids2"] for b in split]), torch.cat([b["input_ids2"] for b in whole]))
    assert tokens == split_tokens == 8 * 2 * whole[0]["input_ids"].shape[1]  # 8 pairs, two documents each


def test_evaluation_runs_in_the_training_micro_batches(compose, tmp_path):
    """A micro-batch set for memory holds at the final evaluation too: it ran at the full lra.batch."""
    from repro.context import RunContext
    from tasks.lra.train_lra import candidates

    cfg = compose("task=lra_retrieval", "lra.attention=[standard]", "lra.batch=8", "lra.n_val=8",
                  "lra.micro_batch.retrieval=2", f"paths.cache={tmp_path}")
    (candidate,) = candidates(cfg, RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {}), tmp_path)
    trainee = candidate.build()
    forwards = []
    trainee.model.register_forward_pre_hook(lambda _, args, kwargs: forwards.append(len(kwargs["input_ids"])),
                                            with_kwargs=True)
    with torch.no_grad():
        rows = trainee.evaluate(trainee.model.eval())
    assert [len(b["labels"]) for b in trainee.batches(0, 0, 1)] == [2] * 4
    assert forwards == [2] * 4 * len(rows) and all(r.extra["examples"] == 8 for r in rows)


def test_masks_with_no_padding_are_left_out_of_a_batch_on_the_host(compose, tmp_path, monkeypatch):
    """Retrieval's second documents unpadded, its first padded: batches and evaluation give the model `real` and
    no `real2` (the model takes no padding from None without reading the mask back from the device)."""
    from repro.context import RunContext
    from tasks.lra import train_lra

    real_load = train_lra.load_split

    def load_split(name, split, n, spec, cache):
        examples, vocab, length = real_load(name, split, n, spec, cache)
        examples["real"][:, -1] = False
        examples["real2"][:] = True
        return examples, vocab, length

    monkeypatch.setattr(train_lra, "load_split", load_split)
    cfg = compose("task=lra_retrieval", "lra.attention=[standard]", f"paths.cache={tmp_path}")
    (candidate,) = train_lra.candidates(cfg, RunContext(torch.device("cpu"), "smoke", 0, tmp_path, {}), tmp_path)
    trainee = candidate.build()
    forwards = []
    trainee.model.register_forward_pre_hook(lambda _, args, kwargs: forwards.append(set(kwargs)), with_kwargs=True)
    with torch.no_grad():
        trainee.evaluate(trainee.model.eval())
    assert forwards and all("real" in keys and "real2" not in keys for keys in forwards)
    assert all("real" in b and "real2" not in b for b in trainee.batches(0, 0, 1))


@pytest.mark.parametrize("scale", ["smoke", "small", "paper"])
def test_lra_recipes_clip_only_path_x_and_decay_the_cosine_to_zero(compose, scale):
    """As LRA's configs: grad_clip_norm 1 in Path-X's (pathfinder128) alone, and cosine_decay ending at 0."""
    from repro.train import TrainSpec, _lr_at

    schedules = set()
    for task in ("lra", "lra_listops", "lra_text", "lra_retrieval", "lra_image", "lra_pathfinder", "pathx", "path256"):
        spec = TrainSpec.from_config(compose(f"task={task}", f"scale={scale}").train)
        assert spec.grad_clip == (1.0 if task == "pathx" else 0), task
        assert spec.min_lr_ratio == 0.0, task  # what a cosine or linear schedule ends at; rsqrt has no end
        schedules.add(spec.schedule)
        if spec.schedule == "cosine":
            assert _lr_at(spec.steps, spec) == 0.0, task
    assert "cosine" in schedules


def test_retrieval_from_the_hub_needs_the_aan_files_a_run_reads(compose, tmp_path):
    """LRA's AAN pairs are not on the hub: lra.data_dir must hold the train, eval and test files, and a missing
    one is named before any work."""
    from repro.context import ConfigError
    from tasks.lra.data import AAN_FILES
    from tasks.lra.train_lra import validate

    cfg = compose("task=lra_retrieval", "lra.source=hub", f"lra.data_dir={tmp_path}")
    for split in ("train", "val", "test"):
        with pytest.raises(ConfigError, match=AAN_FILES[split]):
            validate(cfg)
        (tmp_path / AAN_FILES[split]).write_text("")
    validate(cfg)


def test_pretraining_on_a_larger_image_than_a_task_is_refused(compose):
    """Pre-training grows the position table to the task's image: from Path-256 to Path-X it shrank it instead."""
    from repro.context import ConfigError
    from tasks.lra.train_lra import validate

    with pytest.raises(ConfigError, match=r"lra.pretrain.task='path256' \(256x256\) is larger than .*'pathx' "
                                          r"\(128x128\)"):
        validate(compose("task=pathx", "lra.attention=[standard]", "lra.pretrain={task: path256, steps: 1}"))
    validate(compose("task=pathx", "lra.attention=[standard]", "lra.pretrain={task: path64, steps: 1}"))


def test_the_pretraining_tasks_micro_batch_is_checked_as_a_tasks(compose):
    from repro.context import ConfigError
    from tasks.lra.train_lra import validate

    with pytest.raises(ConfigError, match=r"lra.micro_batch.path64=3 must be null or a positive divisor"):
        validate(compose("task=pathx", "lra.attention=[standard]", "lra.pretrain={task: path64, steps: 1}",
                         "lra.batch=4", "lra.micro_batch.path64=3"))


# settings the tasks, pre-training task and attentions chosen never read: accepted, they would change nothing
@pytest.mark.parametrize("overrides, setting, readers", [
    ("task=lra_listops lra.difficulty=easy", "lra.difficulty='easy'", "pathfinder or path64 or pathx or path256"),
    ("task=lra_pathfinder lra.listops_max_length=900", "lra.listops_max_length=900", "listops"),
    ("task=lra_image lra.max_bytes=100", "lra.max_bytes=100", "text or retrieval"),
    ("task=lra_listops lra.source=hub", "lra.source='hub'", "text or retrieval or image"),
    ("task=lra_listops lra.micro_batch.text=4", "lra.micro_batch.text=4", "text"),
    ("task=lra_listops lra.micro_batch={text:4}", "lra.micro_batch.text=4", "text"),
    ("task=lra_listops lra.attention=[standard] +lra.model.block_size=32", "lra.model.block_size=32",
     "effrepro_sparse"),
    ("task=lra_listops lra.attention=[standard] lra.model={dim:32,linformer_k:8}", "lra.model.linformer_k=8",
     "linformer"),
])
def test_a_setting_no_chosen_task_or_attention_reads_is_refused(job_refusal, overrides, setting, readers):
    message = job_refusal(*overrides.split(), "scale=smoke")
    assert message.startswith(f"{setting} would have no effect: it is read only for {readers}, and lra."), message


def test_lra_data_dir_is_read_only_for_retrieval_from_the_hub(job_refusal):
    message = job_refusal("task=lra_text", "scale=smoke", "lra.data_dir=/tmp")
    assert message.startswith("lra.data_dir='/tmp' would have no effect: only Retrieval with lra.source=hub reads "
                              "it (lra.tasks=['text'], lra.source=fixture)"), message


@pytest.mark.parametrize("overrides", [
    "task=lra_pathfinder lra.difficulty=easy",
    "task=lra lra.tasks=[listops,text] lra.max_bytes=100 lra.listops_max_length=90",
    "task=lra_retrieval lra.micro_batch.retrieval=2 lra.n_train=20 lra.seed=1",  # a fixture's
    "task=pathx lra.attention=[standard] lra.pretrain={task:path64,steps:1} lra.micro_batch.path64=1",
    "task=lra_listops lra.attention=[linformer] lra.model.linformer_k=8",
    "task=lra_listops lra.data_dir=null",  # sets nothing
])
def test_a_setting_a_chosen_task_or_attention_reads_is_taken(compose, overrides):
    from repro.cli import check_job
    check_job(compose(*overrides.split(), "scale=smoke"), [*overrides.split(), "scale=smoke"])


def test_a_hub_set_is_read_whole_so_its_size_and_seed_are_not_settings(compose):
    from tasks.lra.train_lra import unread_keys

    unread = unread_keys(compose("task=lra_text", "lra.source=hub"))
    assert {"lra.n_train", "lra.n_val", "lra.seed"} <= set(unread)
    assert "reads every example from the hub" in unread["lra.n_train"]
    # ListOps and Pathfinder are generated whatever lra.source says
    assert not {"lra.n_train", "lra.n_val", "lra.seed"} & set(unread_keys(compose("task=lra", "lra.source=hub")))


@pytest.mark.parametrize("claim_id", ["table3_lra_text_accuracy", "table3_lra_retrieval_accuracy",
                                      "table3_lra_image_accuracy", "table3_lra_average_accuracy"])
def test_the_accuracy_claims_read_no_rows_of_fixture_data(claim_id):
    """Fixture examples carry random labels: their accuracy is chance, and no claim of the paper reads it."""
    from pathlib import Path

    from repro.claims import load_paper
    from repro.records import RunRecord
    from repro.report import claim_value
    path = Path(__file__).resolve().parents[1] / "results" / "published" / "flashattention.yaml"
    claim = next(c for c in load_paper(path)[2] if c.id == claim_id)

    def value(data):
        if claim_id.endswith("average_accuracy"):
            rows = [Row("effrepro", "tasks", 5, "accuracy_avg", "%", 60.0,
                        extra={"tasks": "a,b,c,d,e", "fixture_tasks": "" if data == "hub" else "text"})]
        else:
            rows = [Row("effrepro", "step", 100, "test_accuracy", "%", 60.0, extra={"data": data})]
        record = RunRecord(task=claim.task, paper="flashattention", scale="paper", claim_ids=[], config={},
                           overrides=[], env={}, started="2026-12-07T00:00:00+00:00", status="ok", rows=rows)
        return claim_value(claim, record)[0]
    assert value("hub") == 60.0 and value("fixture") is None
