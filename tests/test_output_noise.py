"""Clean output: `output_noise` finds library noise in executed notebooks, and the noise that
dpo_lab used to cause (or lets through) is gone at its cause or filtered by its exact message."""
import io
import logging
import subprocess
import sys
import warnings

import nbformat
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from dpo_lab.paths import REPO_ROOT
from dpo_lab.runtime import quiet_known_noise
from dpo_lab.workbook import output_noise, run_notebook


def _stream(name, text):
    return nbformat.v4.new_output("stream", name=name, text=text)


def _write(tmp_path, cells) -> str:
    """A notebook whose code cells have the given outputs (as if executed)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title")]
    for outputs in cells:
        cell = nbformat.v4.new_code_cell("pass")
        cell.outputs = outputs
        nb.cells.append(cell)
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, str(path))
    return path


def _real_tqdm_output(**kwargs) -> str:
    """What tqdm writes to its stream (stderr in a kernel): \\r-separated redraws."""
    buf = io.StringIO()
    for _ in tqdm(range(5), file=buf, mininterval=0, **kwargs):
        pass
    return buf.getvalue()


def test_clean_notebook_has_no_noise(tmp_path):
    path = _write(tmp_path, [
        [_stream("stdout", "loss 0.693\nmax |ours - TRL| = 1.8e-07\n"),
         nbformat.v4.new_output("execute_result", data={"text/plain": "{'warnings': 0}"}, execution_count=1)],
        [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})],
        [],
    ])
    assert output_noise(path) == []


def test_tqdm_progress_bars_on_stderr_are_not_noise(tmp_path):
    bars = [_real_tqdm_output(desc="notebooks", unit="nb"), _real_tqdm_output(desc="steps", total=None),
            _real_tqdm_output(desc="no total", total=None, unit="it")]
    assert all("[00:00" in b for b in bars)  # the format the filter recognises
    path = _write(tmp_path, [[_stream("stderr", b)] for b in bars])
    assert output_noise(path) == []


def test_noisy_notebook_names_each_line_with_its_cell(tmp_path):
    fut = ("/x/transformers/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated\n"
           "  warnings.warn(f\"`{old}` is deprecated\", FutureWarning)\n")
    path = _write(tmp_path, [
        [_stream("stdout", "fine\n")],
        [_stream("stderr", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'\n"),
         _stream("stdout", "result 1.0\n")],
        [_stream("stderr", _real_tqdm_output(desc="steps") + fut)],
        [_stream("stdout", "/x/torch/jit/_script.py:365: DeprecationWarning: `torch.jit.script_method` is deprecated\n"
                           "[W1124 05:00:00.123456 socket.cpp:755] [c10d] The client socket cannot connect\n"
                           "WARNING:root:something\n"
                           "final accuracy 0.9\n")],
    ])
    assert output_noise(path) == [
        "cell 2: Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
        "cell 3: /x/transformers/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated",
        "cell 3: warnings.warn(f\"`{old}` is deprecated\", FutureWarning)",
        "cell 4: /x/torch/jit/_script.py:365: DeprecationWarning: `torch.jit.script_method` is deprecated",
        "cell 4: [W1124 05:00:00.123456 socket.cpp:755] [c10d] The client socket cannot connect",
        "cell 4: WARNING:root:something",
    ]


def test_error_outputs_are_not_noise(tmp_path):
    err = nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=["ValueError: bad"])
    assert output_noise(_write(tmp_path, [[err]])) == []


# --- the causes -------------------------------------------------------------------------------

def _future_warnings(fn):
    """FutureWarnings/DeprecationWarnings that `fn` emits, under dpo_lab's narrow filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()  # back in front of "always", as after `import dpo_lab`
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.mark.parametrize("enabled", [True, False])
def test_trl_args_set_checkpointing_without_a_deprecation_warning(tmp_path, enabled):
    from trl import DPOConfig

    from dpo_lab.dpo.trl_recipe import checkpointing_args
    args, caught = _future_warnings(lambda: DPOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
        **checkpointing_args(enabled, {"use_reentrant": True})))
    assert caught == []
    assert args.gradient_checkpointing is enabled  # what TRL reads, under either transformers
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}


def test_lora_with_checkpointing_warns_nothing():
    from dpo_lab.dpo.config import LoraConfig
    from dpo_lab.dpo.qlora import add_lora
    from dpo_lab.models import build_tiny_model
    model, caught = _future_warnings(lambda: add_lora(build_tiny_model(), LoraConfig(dtype="float32"), True))
    assert caught == []
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # still on


def test_is_gradient_checkpointing_filter_is_narrow():
    def warn_both():
        for msg in ("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                    "`something_else` is deprecated and will be removed in v6."):
            warnings.warn_explicit(msg, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
    _, caught = _future_warnings(warn_both)
    assert caught == ["`something_else` is deprecated and will be removed in v6."]


def test_bitsandbytes_kernels_message_is_dropped_and_nothing_else():
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        # bitsandbytes 0.50's exact call (backends/cpu/ops.py)
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                    "already `pip install kernels` and the kernels >= 0.11.1", ImportError("No module named 'kernels'"))
        log.warning("another bitsandbytes warning")
    finally:
        log.removeHandler(handler)
    assert seen == ["another bitsandbytes warning"]


def test_importing_bitsandbytes_after_dpo_lab_is_silent():
    """On a CPU with AVX512-BF16 (as here) bitsandbytes logs at import (elsewhere it is silent anyway),
    and imports torch's mkldnn module, which uses the deprecated torch.jit.script_method."""
    cmd = [sys.executable, "-W", "always::DeprecationWarning", "-c", "import dpo_lab, bitsandbytes"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # two FSDP units
        self.head = nn.Linear(4, 1)  # the root's

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def test_sharded_collectives_use_no_deprecated_torch_api(tmp_path):
    """FSDP (all-gather + reduce-scatter) and ZeRO-2 (reduce-scatter) on a one-rank gloo group."""
    from dpo_lab.parallel.fsdp import FullyShardedDataParallel
    from dpo_lab.parallel.zero import ShardedOptimizer
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        def train():
            torch.manual_seed(0)
            net = FullyShardedDataParallel(_Blocks())
            net(torch.randn(3, 4)).sum().backward()
            net.finish_gradient_synchronization()
            lin = nn.Linear(4, 2)
            opt = ShardedOptimizer(lin.parameters(), torch.optim.SGD, stage=2, lr=0.1)
            lin(torch.randn(3, 4)).sum().backward()
            opt.step()
        _, caught = _future_warnings(train)
    finally:
        dist.destroy_process_group()
    assert caught == []


def test_kernel_runs_without_the_plain_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("OUTPUT_DIR = '.'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "import json, pathlib\np = pathlib.Path(OUTPUT_DIR, 'metrics', '99_k.json')\n"
                    "p.parent.mkdir(parents=True, exist_ok=True)\np.write_text(json.dumps({'x': 1}))")]
    nbformat.write(nb, str(tmp_path / "99_k.ipynb"))
    res = run_notebook("99_k", output_dir=tmp_path / "out", source_dir=tmp_path, cell_timeout=300)
    assert res["figures"] == {"x": 1}
    err = capfd.readouterr().err  # the kernel process writes its log to our stderr
    assert "without encryption" not in err
