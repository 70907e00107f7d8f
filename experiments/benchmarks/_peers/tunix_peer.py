"""tunix peer of `sft_throughput.py`: `tunix.sft.peft_trainer.PeftTrainer` on tunix's own Llama 3 model.

The model comes from the shared HF directory through `tunix.models.llama3.params.create_model_from_safe_tensors`
(if that fails, a randomly initialised model of the same shapes, and the result says so). Full-parameter
training (no LoRA), optax AdamW behind global-norm clipping at 1.0, no mesh (one CPU device), no checkpoints,
no metrics backends, no progress bar.
--mode step: the trainer's jitted train step (`jit_train_and_eval_step`, as `train()` builds it) in a plain loop.
--mode compare (for `sft_step_compare.py`): the same timing, plus XLA's cost and memory analysis of the trainer's
  `_train_step` as one pure jitted function of (model + optimizer state, batch), state donated as polmjax's (HLO
  text into --dump-dir); with --target also compiled ahead of time for one chip of that TPU slice (needs libtpu in
  this venv: pip install "jax[tpu]==<this venv's jax version>").
--mode trainer: `PeftTrainer.train()`, step times from `TrainingHooks.on_train_step_start`: the interval between
  two step starts is the steady-state step time (tunix dispatches step i asynchronously, then waits for step
  i-1's loss). One extra step runs last so that every timed interval ends at a step start (an interval ending
  at `on_train_end` would also hold the draining of the async queue).
tunix compiles its step twice when there is no mesh (the optimizer state changes layout after the first call),
so --warmup must be >= 2 to keep the second compilation out of the timed steps.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as common  # noqa: E402


def main():
    args = common.parse_args(["step", "trainer", "compare"])
    import jax
    import jax.numpy as jnp
    import optax
    from tunix.sft import hooks, peft_trainer
    from tunix.sft import utils as sft_utils

    tokens_BT, loss_mask_BT = common.load_batch(args)
    model, notes = load_model(args.hf_dir)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
    total = args.warmup + args.steps
    # max_steps=None: the loop ends when the data does (max_steps would also start a tqdm progress bar)
    config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optimizer, config)

    def gen_model_input(x):
        valid_BT = jnp.ones(x.input_tokens.shape, jnp.bool_)  # no padding
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(valid_BT),
                "attention_mask": sft_utils.make_causal_attn_mask(valid_BT)}

    trainer = trainer.with_gen_model_input_fn(gen_model_input)
    # tunix's default loss takes targets = tokens[:, 1:] where input_mask[:, 1:]: the same tokens as ours
    example = peft_trainer.TrainingInput(input_tokens=jnp.asarray(tokens_BT), input_mask=jnp.asarray(loss_mask_BT > 0))
    first_loss = float(peft_trainer._default_loss_fn(model, **gen_model_input(example)))
    vers = common.versions("google-tunix", "jax", "jaxlib", "flax", "optax", "libtpu")
    extra = {}

    if args.mode in ("step", "compare"):
        train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
        compiled = _compiled_train_step(trainer, example)
        if args.mode == "compare":
            common.dump_hlo(args, "tunix_cpu", compiled)
            extra["cpu"] = common.cost_report(compiled)
        else:
            notes.append(common.xla_cost(compiled))

        def step():
            return jax.block_until_ready(train_step(example))

        _, steps = common.time_steps(step, args.warmup, args.steps)
        path = "PeftTrainer jitted train step, loop"
        if args.mode == "compare" and args.target:
            try:
                compiled = _compiled_train_step(trainer, example, common.tpu_devices(args.target)[0])
                common.dump_hlo(args, f"tunix_{args.target.replace(':', '_')}", compiled)
                extra["tpu"] = {"xla": common.cost_report(compiled)}
            except Exception as e:  # noqa: BLE001 - reported in the table; the CPU numbers still stand
                extra["tpu_error"] = common.one_line(e)
    else:
        class Timer(hooks.TrainingHooks):
            """Marks each step's start: step i lasts from its start to step i+1's."""

            def __init__(self):
                self.clock = common.Clock()

            def on_train_start(self, ctx):
                pass

            def on_train_end(self, ctx):
                pass

            def on_train_step_start(self, ctx):
                self.clock.mark()

            def on_train_step_end(self, ctx, train_step, train_loss):
                pass

            def on_eval_step_start(self, ctx):
                pass

            def on_eval_step_end(self, ctx, eval_loss):
                pass

        timer = Timer()
        trainer.with_training_hooks(timer)
        trainer.train([example] * (total + 1))
        steps = timer.clock.steps(args.warmup)
        path = "PeftTrainer.train() + TrainingHooks"
        notes.append(f"{len(timer.clock.marks)} steps run; the last one only closes the last timed interval")
    common.write(args, framework="tunix", path=path, steps=steps, first_loss=first_loss, versions=vers,
                 notes=notes, **extra)


def load_model(hf_dir):
    """tunix's Llama 3 with the shared HF directory's weights: (model, [a note on where the weights came from])."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama_lib
    from tunix.models.llama3 import params as llama_params

    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    cfg = llama_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
        norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings", False)))
    try:
        model = llama_params.create_model_from_safe_tensors(hf_dir, cfg, mesh=None, dtype=jnp.float32)
        return model, ["weights loaded from the shared HF dir (tunix.models.llama3.params)"]
    except Exception as e:  # noqa: BLE001 - the step cost does not depend on the weight values
        model = llama_lib.Llama3(cfg, rngs=nnx.Rngs(0))
        return model, [f"could not load the HF weights ({type(e).__name__}: {str(e)[:200]}); random init, same shapes"]


def _compiled_train_step(trainer, example, device=None):
    """The trainer's `_train_step` as one pure jitted function of (model + optimizer state, batch), state
    donated, compiled for this host or (device: a compile-only TPU device) for that device."""
    import jax
    from flax import nnx

    graph, state = nnx.split((trainer.model, trainer.optimizer))

    def pure(state, example):
        model, optimizer = nnx.merge(graph, state)
        out = trainer._train_step(model, optimizer, example)
        return out, nnx.state((model, optimizer))

    args = (state, example)
    if device is not None:
        sharding = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), args)
    return jax.jit(pure, donate_argnums=0).lower(*args).compile()


if __name__ == "__main__":
    common.guarded(main)
