"""Plant known bugs, one at a time, in a temporary copy of the repository and run the tests that claim to catch
each one; print caught / missed. Every planted bug must be caught (exit status 1 otherwise).

    python scripts/mutation_check.py                 # all mutations (~15-20 min on 2 cores)
    python scripts/mutation_check.py --only lr_never_decays padding_of_row_0
    python scripts/mutation_check.py --list

Each mutation replaces one exact snippet of one file (the script stops if the snippet is not found exactly once,
so a refactor that moves the code is noticed, not silently skipped). The copy is imported instead of the
checkout: the tests run with the copy as working directory and first on PYTHONPATH, and the copy gets a
`megacoca_kernels` link to its own kernels/ (the editable install would otherwise map that name back to the
checkout). Before the mutations the same tests run once unmutated: they must pass, or a "caught" would mean
nothing. Not part of CI (it re-runs slow tests several times).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "step_tokens_counted_locally", "the step's caption tokens are this rank's, not the global batch's",
        "megacoca/losses/caption.py",
        "        total = all_reduce_sum(local_tokens.to(torch.float32), dp_group).clamp(min=1)\n",
        "        total = local_tokens.to(torch.float32).clamp(min=1)\n",
        ("tests/distributed/test_global_negatives.py::test_global_negatives_equal_one_micro_batch_of_the_whole_batch"
         "[2ranks]",),
    ),
    Mutation(
        "negatives_text_ahead_not_replayed", "under a pipeline, text-ahead's text tower draws other masks in pass 2",
        "megacoca/schedules/pipeline.py",
        '                with piece(self.negatives, run.step, "T", k):\n                    run.text_outputs[k]',
        '                with piece(None, run.step, "T", k):\n                    run.text_outputs[k]',
        ("tests/distributed/test_global_negatives.py::test_global_negatives_equal_one_micro_batch_of_the_whole_batch"
         "[2ranks]",),
    ),
    Mutation(
        "negatives_grad_to_wrong_micro_batch", "global negatives apply micro-batch k+1's cached gradient to k",
        "megacoca/schedules/negatives.py",
        "        image_grad, text_grad = self.grads[k]\n",
        "        image_grad, text_grad = self.grads[(k + 1) % len(self.grads)]\n",
        ("tests/distributed/test_global_negatives.py::test_global_negatives_equal_one_micro_batch_of_the_whole_batch"
         "[1rank]",),
    ),
    Mutation(
        "negatives_remote_rows_detached", "the gathered embeddings pass no gradient back to the ranks they came from",
        "megacoca/schedules/negatives.py",
        "            all_image = all_gather_with_grad(image, self.dp_group)\n",
        "            all_image = all_gather_with_grad(image, self.dp_group).detach()\n",
        ("tests/distributed/test_global_negatives.py::test_global_negatives_equal_one_micro_batch_of_the_whole_batch"
         "[2ranks]",),
    ),
    Mutation(
        "negatives_randomness_not_replayed", "pass 2 draws other dropout masks than pass 1",
        "megacoca/schedules/accumulate.py",
        '            with piece(self.negatives, step, "F", k):  # pass 2 draws what pass 1 drew\n',
        '            with piece(None, step, "F", k):  # pass 2 draws what pass 1 drew\n',
        ("tests/distributed/test_global_negatives.py::test_global_negatives_equal_one_micro_batch_of_the_whole_batch"
         "[1rank]",),
    ),
    Mutation(
        "pipeline_position_not_shared", "stages after the first keep a stale data position in their rank files",
        "megacoca/schedules/pipeline.py",
        "        if not self.stage.is_first and state[0] is not None:\n",
        "        if False:\n",
        ("tests/distributed/test_resume.py",),
    ),
    Mutation(
        "planner_imports_the_trainer", "the planner reaches up to the trainer (a floor broken)",
        "megacoca/plan/params.py",
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nimport megacoca.trainer  # noqa: F401\n",
        ("tests/unit/test_floors.py",),
    ),
    Mutation(
        "padding_of_row_0", "the text key mask uses row 0's padding for every row",
        "megacoca/models/coca/text.py",
        "    real = text != pad_id\n",
        "    real = (text != pad_id)[:1].expand_as(text)\n",
        ("tests/unit/models/test_model.py", "tests/unit/eval"),
    ),
    Mutation(
        "contrastive_gather_without_grad", "the contrastive all-gather passes no gradient back to other ranks",
        "megacoca/parallel/collectives.py",
        "    return all_reduce_backward(all_gather_along(tensor, 0, group), group)\n",
        "    return all_gather_along(tensor, 0, group)\n",
        ("tests/distributed/test_loss_dp.py",),
    ),
    Mutation(
        "caption_loss_local_token_count", "the caption loss is normalised by the local, not the global, token count",
        "megacoca/losses/caption.py",
        "    global_tokens = all_reduce_sum(caption_tokens.to(torch.float32), dp_group).clamp(min=1)\n",
        "    global_tokens = (caption_tokens.to(torch.float32) * group_size(dp_group)).clamp(min=1)\n",
        ("tests/distributed/test_loss_dp.py",),
    ),
    Mutation(
        "resume_without_data_position", "resume restores the weights but not the loader's data position",
        "megacoca/checkpoint/state.py",
        "        train_loader.load_state_dict(local[\"data\"])\n",
        "        pass\n",
        ("tests/distributed/test_resume.py", "tests/distributed/test_resume_shards.py"),
    ),
    Mutation(
        "cls_attends_to_padding", "the unimodal text stage lets the CLS (and pads) attend to pad keys",
        "megacoca/models/coca/text.py",
        "    return F.pad(real, (0, 1), value=True)\n",
        "    return torch.ones_like(F.pad(real, (0, 1), value=True))\n",
        ("tests/unit/models/test_model.py",),
    ),
    Mutation(
        "flash_causal_mask_off_by_one", "the flash-attention forward's causal mask lets query i see key i + 1",
        "kernels/flash_attention_kernels.py",
        "            s = tl.where(cols[None, :] <= offs_m[:, None], s, float(\"-inf\"))\n",
        "            s = tl.where(cols[None, :] <= offs_m[:, None] + 1, s, float(\"-inf\"))\n",
        ("tests/kernels/test_flash_attention.py",),
    ),
    Mutation(
        "tp_copy_without_allreduce", "the tensor-parallel copy's backward does not sum the ranks' gradients",
        "megacoca/parallel/tensor/mappings.py",
        "def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:\n    return all_reduce_backward(x, group)\n",
        "def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:\n    return x\n",
        ("tests/distributed/test_tensor_parallel.py::test_tp2_equals_one_process",),
    ),
    Mutation(
        "tp_row_bias_before_reduce", "the row-parallel bias is added on every rank before the all-reduce",
        "megacoca/parallel/tensor/layers.py",
        "        out = reduce_from_tp(F.linear(x, self.weight), self.group)\n"
        "        return out + self.bias if self.bias is not None else out\n",
        "        return reduce_from_tp(F.linear(x, self.weight, self.bias), self.group)\n",
        ("tests/distributed/test_tensor_parallel.py::test_tp2_equals_one_process",),
    ),
    Mutation(
        "tp_vocab_padding_unmasked", "the padded vocabulary rows take part in the torch cross-entropy",
        "megacoca/parallel/tensor/cross_entropy.py",
        "    if vocab_valid < logits.shape[-1]:\n",
        "    if False:\n",
        ("tests/distributed/test_tensor_parallel.py::test_tp2_equals_one_process",),
    ),
    Mutation(
        "tp_params_unmarked", "sharded parameters lack tensor_model_parallel (DeepSpeed's grad norm counts them once)",
        "megacoca/parallel/tensor/layers.py",
        "    param.tensor_model_parallel = True\n",
        "    param.tensor_model_parallel = False\n",
        ("tests/distributed/test_tensor_parallel.py::test_tp2_equals_one_process",),
    ),
    Mutation(
        "pp_grad_scaled_twice", "a middle pipeline stage divides the received gradient by the micro-batch count again",
        "megacoca/schedules/pipeline.py",
        "self.engine.backward((y * grad).sum(), scale_wrt_gas=False)",
        "self.engine.backward((y * grad).sum(), scale_wrt_gas=True)",
        ("tests/distributed/test_pipeline.py::test_pp2_equals_one_process",),
    ),
    Mutation(
        "pp_backwards_not_closed", "consecutive pipeline backwards overwrite each other's ZeRO gradients",
        "megacoca/schedules/pipeline.py",
        "        self._close_backward()\n",
        "",
        ("tests/distributed/test_pipeline.py::test_pp2_dp2_pp2_tp2_and_pp4_equal_one_process",),
    ),
    Mutation(
        "pp_text_ahead_wrong_micro_batch", "text-ahead runs the text tower on the next micro-batch's captions",
        "megacoca/schedules/pipeline.py",
        'run.text_outputs[k] = self.engine(text=run.texts[k], keep=run.keep(k), part="text")',
        'run.text_outputs[k] = self.engine(text=run.texts[min(k + 1, self.micro_batches - 1)], '
        'keep=run.keep(min(k + 1, self.micro_batches - 1)), part="text")',
        ("tests/distributed/test_pipeline.py::test_pp2_equals_one_process",),
    ),
    Mutation(
        "lr_never_decays", "the lr schedule stays at its peak after warmup",
        "megacoca/optim.py",
        "        progress = min((step - warmup) / (total - warmup), 1.0)\n",
        "        progress = 0.0\n",
        ("tests/unit/config/test_optim_schedule.py",),
    ),
    Mutation(
        "step_guard_lets_a_nonfinite_loss_through", "an inf loss is backpropagated as is (its gradients are finite)",
        "megacoca/step_guard.py",
        "        return loss * gate\n",
        "        return loss\n",
        ("tests/distributed/test_step_guard.py::test_bad_steps_are_skipped_on_every_rank_with_nothing_changed",),
    ),
    Mutation(
        "zero0_torch_optimizer_never_skips", "ZeRO-0 fp32's torch optimizer steps on NaN gradients",
        "megacoca/step_guard.py",
        "            optimizer.overflow = self.own_skip\n",
        "            optimizer.overflow = False\n",
        ("tests/distributed/test_step_guard.py::test_bad_steps_are_skipped_on_every_rank_with_nothing_changed",),
    ),
    Mutation(
        "pruned_checkpoint_keeps_its_marker", "a pruned checkpoint loses its files before its COMPLETE marker",
        "megacoca/checkpoint/files.py",
        "    try:\n        os.remove(os.path.join(path, marker))\n    except FileNotFoundError:\n        pass\n"
        "    faults.point(\"remove:after_unmark\")\n",
        "    faults.point(\"remove:after_unmark\")\n",
        ("tests/unit/checkpoint",),
    ),
    Mutation(
        "launched_job_never_evaluates", "a launched job with held-out shards never runs the periodic eval hook",
        "megacoca/cli/train.py",
        "if job.eval.every and job.data.val_shards \\\n",
        "if job.eval.every and not job.data.val_shards \\\n",
        ("tests/e2e/test_train_launchers.py::test_deepspeed_num_gpus_module_then_resume_under_another_layout",),
    ),
]


def copy_repo(destination: str) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout (what CI would see), plus the link that
    makes `megacoca_kernels` resolve inside the copy. Taken once, at the start: every run copies that snapshot."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for relative in filter(None, listed):
        source = os.path.join(REPO, relative)
        if not os.path.isfile(source):
            continue  # deleted in the work tree
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)
    os.symlink("kernels", os.path.join(destination, "megacoca_kernels"))


def source_of(root: str, mutation: Mutation) -> str:
    """The file the mutation edits; stops the script unless the snippet occurs in it exactly once."""
    with open(os.path.join(root, mutation.path)) as handle:
        text = handle.read()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: expected the snippet exactly once in {mutation.path}, found "
                         f"{count}; update scripts/mutation_check.py to follow the code")
    return text


def apply(root: str, mutation: Mutation) -> None:
    text = source_of(root, mutation)
    with open(os.path.join(root, mutation.path), "w") as handle:
        handle.write(text.replace(mutation.old, mutation.new))


def run_tests(root: str, tests: tuple[str, ...], timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, last lines of output) for pytest on `tests` inside the copy."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1")
    check = subprocess.run([sys.executable, "-c", "import megacoca, megacoca_kernels; "
                            "print(megacoca.__file__); print(megacoca_kernels.__file__)"],
                           cwd=root, env=env, capture_output=True, text=True, check=True).stdout.split()
    if not all(path.startswith(root) for path in check):
        raise SystemExit(f"the copy is not what gets imported: {check}")
    began = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 "-W", "ignore::FutureWarning", *tests], cwd=root, env=env, capture_output=True,
                                text=True, timeout=timeout)
        passed, output = result.returncode == 0, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        passed, output = False, f"timed out after {timeout:.0f}s\n{error.stdout or ''}"
    tail = [line for line in output.splitlines() if line.strip()][-3:]
    return passed, time.perf_counter() - began, "\n".join(tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = parser.parse_args()
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name:34s} {mutation.what} ({mutation.path}) -> {' '.join(mutation.tests)}")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutations {sorted(unknown)}; see --list")

    rows = []
    with tempfile.TemporaryDirectory(prefix="megacoca_mutation_") as scratch:
        snapshot = os.path.join(scratch, "snapshot")  # the checkout as it is now; later edits do not leak in
        copy_repo(snapshot)
        for mutation in chosen:  # every snippet must be found before anything runs
            source_of(snapshot, mutation)
        baseline = os.path.join(scratch, "baseline")
        shutil.copytree(snapshot, baseline, symlinks=True)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        passed, seconds, tail = run_tests(baseline, tests, args.timeout)
        print(f"baseline (no mutation): {'pass' if passed else 'FAIL'} in {seconds:.0f}s", flush=True)
        if not passed:
            print(tail)
            raise SystemExit("the unmutated tests fail: fix them before judging mutations")
        for mutation in chosen:
            root = os.path.join(scratch, mutation.name)
            shutil.copytree(snapshot, root, symlinks=True)
            apply(root, mutation)
            passed, seconds, tail = run_tests(root, mutation.tests, args.timeout)
            rows.append((mutation, not passed, seconds))
            print(f"{mutation.name}: {'caught' if not passed else 'MISSED'} in {seconds:.0f}s "
                  f"({tail.splitlines()[-1] if tail else ''})", flush=True)
            shutil.rmtree(root, ignore_errors=True)

    print()
    print("| planted bug | file | tests | result | seconds |")
    print("|---|---|---|---|---|")
    for mutation, caught, seconds in rows:
        print(f"| {mutation.what} | {mutation.path} | {', '.join(mutation.tests)} | "
              f"{'caught' if caught else '**missed**'} | {seconds:.0f} |")
    missed = [m.name for m, caught, _ in rows if not caught]
    print(f"\n{len(rows) - len(missed)}/{len(rows)} caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
