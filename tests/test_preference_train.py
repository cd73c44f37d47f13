"""DPO and ORPO (``train.task: dpo | orpo``): the loss at initialisation, gradient sign,
ORPO without its odds-ratio term = SFT on the chosen responses, DPO against a PyTorch
transcription, the reference under LoRA = the base model, LoRA-DPO fitting one batch, and
``fit`` on the (2, 2, 2) fake mesh = one device."""

import json
import pathlib
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cadenza.models import Transformer, init_params, save_model
from cadenza.train import fit
from cadenza.train.data import build_iterator
from cadenza.train.mesh import make_mesh
from cadenza.train.preference_task import dpo_loss, pair_logps, preference_task
from cadenza.train.step import token_losses

REF_PYTHON = pathlib.Path(__file__).resolve().parent.parent / ".venv-ref" / "bin" / "python"


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, pref_config):
    config = pref_config()
    return save_model(tmp_path_factory.mktemp("sft") / "model", config,
                      init_params(config.model, jax.random.key(0)))


@pytest.fixture(scope="module")
def batch(pref_config):
    b = next(build_iterator(pref_config()))
    return {k: jnp.asarray(v) for k, v in b.items()}


def swap_sides(batch):
    seg = batch["segment_ids"]
    return {**batch, "segment_ids": jnp.where(seg > 0, jnp.where(seg % 2 == 1, seg + 1, seg - 1),
                                              0)}


def task_and_trees(config):
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    rules = config.mesh.rules()
    task = preference_task(config)
    frozen = task.load_frozen(mesh, rules)
    trainable = task.init_trainable(jax.random.key(1), mesh, rules)
    return task, trainable, frozen, rules


def mean_loss(task, rules):
    """``(trainable, frozen, batch) -> (loss, metrics)``: the task's loss averaged over
    the pairs of ``batch`` (no noise)."""
    def f(p, frozen, batch):
        with nn.logical_axis_rules(rules):
            objective, _, count, metrics = task.loss(p, frozen, batch, None)
        return objective / count, {k: v / count for k, v in metrics.items()}
    return f


def loss_and_grad(task, rules, trainable, frozen, batch):
    return jax.jit(jax.value_and_grad(mean_loss(task, rules), has_aux=True))(
        trainable, frozen, batch)


def test_dpo_starts_at_log2_and_swapping_the_pair_flips_the_gradient(pref_config, sft_dir,
                                                                     batch):
    config = pref_config("train.task=dpo", f"train.init_from={sft_dir}", "mesh.data=1")
    task, trainable, frozen, rules = task_and_trees(config)
    # forward (what eval reports): policy = reference bit for bit, every margin exactly 0
    loss, metrics = jax.jit(mean_loss(task, rules))(trainable, frozen, batch)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-7)
    assert float(metrics["reward_accuracy"]) == 0.5 and float(metrics["reward_margin"]) == 0
    # under differentiation XLA may fuse the policy's forward differently (ulp-level)
    (loss, _), grad = loss_and_grad(task, rules, trainable, frozen, batch)
    (swapped, _), grad_swapped = loss_and_grad(task, rules, trainable, frozen, swap_sides(batch))
    np.testing.assert_allclose([loss, swapped], np.log(2.0), rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_swapped)):
        np.testing.assert_allclose(h, -g, rtol=1e-4, atol=1e-8)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad))


def test_orpo_without_the_odds_ratio_is_sft_on_the_chosen_responses(pref_config):
    config = pref_config("train.task=orpo", "train.preference.orpo_lambda=0", "mesh.data=1")
    task, trainable, frozen, rules = task_and_trees(config)
    # two rows, one pair each, chosen responses of equal length (the SFT loss is a token
    # mean, ORPO's NLL a mean over pairs of each response's token mean)
    rng = np.random.default_rng(0)
    t = 16
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * 6 + [2] * 4 + [0] * 6], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1] + [0] * 3,
                     [0, 0, 0, 1, 1, 1, 1] + [0, 1, 1] + [0] * 6], np.float32)
    mask[1, :6] = [0, 0, 1, 1, 1, 1]
    pos = np.where(seg == 1, np.arange(t), np.arange(t) - 6) * (seg > 0)
    b = {"inputs": jnp.asarray(rng.integers(3, 300, (2, t)), jnp.int32),
         "targets": jnp.asarray(rng.integers(3, 300, (2, t)), jnp.int32),
         "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg),
         "positions": jnp.asarray(pos, jnp.int32)}
    (orpo, metrics), grad = loss_and_grad(task, rules, trainable, frozen, b)

    def sft(p):
        with nn.logical_axis_rules(rules):
            logits = task.apply(p, frozen, b, None)
        _, ce, count = token_losses(logits, b["targets"], b["loss_mask"] * (seg == 1))
        return ce / count
    sft_loss, sft_grad = jax.jit(jax.value_and_grad(sft))(trainable)
    np.testing.assert_allclose(orpo, sft_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["nll"], sft_loss, rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(sft_grad)):   # float32 sums in
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)            # another order


TORCH_DPO = r"""
import sys, numpy as np, torch, torch.nn.functional as F
d = np.load(sys.argv[1]); out = {}
def side_logps(logits, row, s):
    sel = torch.from_numpy(d["segment_ids"][row] == s)
    lp = torch.log_softmax(torch.from_numpy(logits[row]).double(), -1)
    tok = torch.gather(lp, -1, torch.from_numpy(d["targets"][row]).long()[:, None])[:, 0]
    m = torch.from_numpy(d["loss_mask"][row]).double() * sel
    return (tok * m).sum(), m.sum()
pol, ref, lens = [], [], []
for row in range(d["targets"].shape[0]):
    for k in range(1, int(d["segment_ids"][row].max()) // 2 + 1):
        (pc, nc), (pr, nr) = [side_logps(d["policy"], row, s) for s in (2 * k - 1, 2 * k)]
        (rc, _), (rr, _) = [side_logps(d["reference"], row, s) for s in (2 * k - 1, 2 * k)]
        pol.append((pc, pr)); ref.append((rc, rr)); lens.append((nc, nr))
pc, pr = map(torch.stack, zip(*pol)); rc, rr = map(torch.stack, zip(*ref))
nc, nr = map(torch.stack, zip(*lens))
beta = float(d["beta"])
logits = (pc - pr) - (rc - rr)                               # TRL's dpo_loss, written out
out["sigmoid"] = -F.logsigmoid(beta * logits).mean()
out["hinge"] = torch.relu(1 - beta * logits).mean()
ipo = (pc / nc - pr / nr) - (rc / nc - rr / nr)
out["ipo"] = ((ipo - 1 / (2 * beta)) ** 2).mean()
cr, rj = beta * (pc - rc), beta * (pr - rr)
out["chosen_reward"], out["rejected_reward"] = cr.mean(), rj.mean()
out["reward_accuracy"] = ((cr > rj).double() + 0.5 * (cr == rj).double()).mean()
print({k: float(v) for k, v in out.items()})
"""


@pytest.mark.skipif(not REF_PYTHON.exists(), reason="reference env (.venv-ref) not set up")
def test_dpo_matches_a_pytorch_transcription(tmp_path, batch):
    rng = np.random.default_rng(0)
    shape = batch["targets"].shape + (40,)
    targets = np.asarray(batch["targets"]) % 40
    policy, reference = rng.normal(size=shape) * 2, rng.normal(size=shape) * 2
    b = {**batch, "targets": jnp.asarray(targets)}
    ours = {}
    for loss in ("sigmoid", "ipo", "hinge"):
        total, _, count, metrics = dpo_loss(pair_logps(jnp.asarray(policy, jnp.float32), b),
                                            pair_logps(jnp.asarray(reference, jnp.float32), b),
                                            0.3, loss)
        ours[loss] = float(total / count)
        ours.update({k: float(v / count) for k, v in metrics.items()})
    np.savez(tmp_path / "b.npz", policy=policy.astype(np.float32),
             reference=reference.astype(np.float32), targets=targets,
             loss_mask=np.asarray(batch["loss_mask"]),
             segment_ids=np.asarray(batch["segment_ids"]), beta=0.3)
    (tmp_path / "dpo.py").write_text(TORCH_DPO)
    out = subprocess.run([str(REF_PYTHON), str(tmp_path / "dpo.py"), str(tmp_path / "b.npz")],
                         capture_output=True, text=True, check=True, timeout=300)
    theirs = eval(out.stdout.strip().splitlines()[-1], {})   # a dict of floats we printed
    for k, v in theirs.items():
        np.testing.assert_allclose(ours[k], v, rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("peft", ["lora", "qlora"])
def test_lora_reference_is_the_base_model(pref_config, sft_dir, batch, peft):
    """The reference is the (QLoRA: quantised) base with the adapters off: its log-probs
    equal a plain forward of the base's params (QLoRA: dequantised independently)."""
    from cadenza.train.peft.model import build

    config = pref_config("train.task=dpo", f"train.init_from={sft_dir}", f"peft.method={peft}",
                         "train.preference.beta=0.5", "mesh.data=1")
    task, trainable, frozen, rules = task_and_trees(config)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape),
                             trainable)
    model = Transformer(config.model)

    pm = build(config.model, config.peft)

    @jax.jit
    def run(trainable, frozen, batch):
        _, metrics = mean_loss(task, rules)(trainable, frozen, batch)
        with nn.logical_axis_rules(rules):
            policy = pair_logps(task.apply(trainable, frozen, batch, None), batch)
            params = (pm.dequantized_params(frozen["task"]) if peft == "qlora"
                      else frozen["task"]["params"])
            base = model.apply({"params": params}, batch["inputs"],
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
        return metrics, policy, pair_logps(base[0], batch)
    metrics, policy, base = run(trainable, frozen, batch)
    valid = (policy[2] > 0) & (policy[3] > 0)
    n = valid.sum()
    expected = 0.5 * jnp.where(valid, policy[0] - base[0], 0).sum() / n
    np.testing.assert_allclose(metrics["chosen_reward"], expected, rtol=1e-5)
    assert abs(float(metrics["chosen_reward"])) > 1e-4   # the adapters do change the policy
    assert "reference" not in frozen                     # no second copy of the weights
    quantised = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(
        frozen)[0] if "quant_codes" in jax.tree_util.keystr(k)]
    assert bool(quantised) == (peft == "qlora")


@pytest.mark.parametrize("task,peft", [("dpo", "none"), ("orpo", "lora")])
def test_fit_on_the_fake_mesh_equals_one_device(tmp_path, pref_config, sft_dir, task, peft):
    runs = {}
    for name, mesh, devices in (("one", ["mesh.data=1"], jax.devices()[:1]),
                                ("mesh", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                                 jax.devices()[:8])):
        config = pref_config(f"train.task={task}", f"train.init_from={sft_dir}",
                             f"peft.method={peft}", f"train.output_dir={tmp_path / name}",
                             "train.steps=2", "train.batch_size=8", "train.microbatches=2",
                             "train.learning_rate=1e-2", "train.warmup_steps=0",
                             "train.log_every=1", f"train.eval_every={2 if task == 'dpo' else 0}",
                             "train.eval_steps=1",
                             "train.progress_bar=false", "train.tensorboard=false",
                             "train.async_checkpoints=false", *mesh)
        fit(config, devices=devices)
        runs[name] = [json.loads(line) for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, mesh = runs["one"], runs["mesh"]
    assert {"reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= set(one[-1])
    assert task == "orpo" or {"eval_reward_accuracy", "eval_loss"} <= set(one[-1])
    for a, b in zip(one, mesh):
        for k in ("loss", "reward_accuracy", "reward_margin", "eval_loss"):
            if k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)


def test_lora_dpo_fits_one_batch(pref_config, sft_dir, batch):
    """A few Adam steps on one batch drive LoRA-DPO's training reward accuracy to 1
    (catches a flipped loss, a reference that moves with the adapters, adapters that get
    no gradient)."""
    import optax

    config = pref_config("train.task=dpo", f"train.init_from={sft_dir}", "peft.method=lora",
                         "train.preference.beta=0.5", "mesh.data=1")
    task, trainable, frozen, rules = task_and_trees(config)
    opt = optax.adam(2e-2)
    grad_fn = jax.value_and_grad(mean_loss(task, rules), has_aux=True)

    @jax.jit
    def step(p, state):
        (loss, metrics), g = grad_fn(p, frozen, batch)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, loss, metrics

    state = opt.init(trainable)
    for _ in range(25):   # the metrics are those before the last update
        trainable, state, loss, metrics = step(trainable, state)
    assert float(metrics["reward_accuracy"]) == 1.0 and float(metrics["reward_margin"]) > 1.0
