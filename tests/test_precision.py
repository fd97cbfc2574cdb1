"""Precision chosen for the machine: bf16 where the device computes it natively (the CPU's flags),
float32 elsewhere; the training CLI's --bf16 auto|on|off, its record in the run and on --resume."""

import json
import os

import pytest
import torch

from lavae_fast import performance
from lavae_fast import train as T
from lavae_fast.checkpoint import load_checkpoint, save_checkpoint
from lavae_fast.model import LAVAE

# /proc/cpuinfo flags lines (abridged) of three kinds of x86 CPU.
AVX2 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
        "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 "
        "movbe popcnt aes xsave avx f16c rdrand lahf_lm abm bmi1 avx2 smep bmi2 erms")
AVX512 = AVX2 + " avx512f avx512dq rdseed adx avx512cd avx512bw avx512vl avx512_vnni"  # Skylake/Cascade Lake
AVX512_BF16 = AVX512 + " avx512_bf16"  # Cooper Lake, Zen 4
AMX = AVX512 + " avx512_bf16 amx_bf16 amx_tile amx_int8"  # Sapphire Rapids

TINY = ["--dataset", "multi-dsprites", "--canvas", "32", "--n-train", "64", "--n-test", "16", "--n-test7", "8",
        "--batch-size", "4", "--width", "6", "--sprite-width", "36", "--threads", "1", "--no-progress",
        "--log-every", "2", "--eval-every", "0", "--steps", "2"]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,native,why", [
    (AVX2, False, "neither avx512_bf16 nor amx_bf16 (AVX2)"),
    (AVX512, False, "neither avx512_bf16 nor amx_bf16 (AVX-512)"),
    (AVX512_BF16, True, "the CPU has avx512_bf16"),
    (AMX, True, "the CPU has avx512_bf16 and amx_bf16"),
    ("", False, "no flags"),
])
def test_cpu_flags_parser(flags, native, why):
    got, reason = performance.bf16_native_from_cpu_flags(flags)
    assert got is native and why in reason
    if not native:
        assert "emulated" in reason and f"{performance.BF16_EMULATED_SLOWDOWN}x" in reason


def test_cpu_flags_parser_reads_the_flags_line_of_a_whole_cpuinfo():
    # Only the flags line counts: "bf16" elsewhere (a model name, the bugs line) is not a flag.
    info = (f"processor\t: 0\nmodel name\t: Fake avx512_bf16 CPU\nflags\t\t: {AVX2}\nbugs\t\t: amx_bf16\n\n"
            f"processor\t: 1\nflags\t\t: {AVX2}\n")
    assert performance.bf16_native_from_cpu_flags(info)[0] is False
    assert performance.bf16_native_from_cpu_flags(info.replace(AVX2, AVX512_BF16, 1))[0] is True


def test_bf16_native_reads_proc_cpuinfo_and_honours_a_onednn_cap(monkeypatch):
    monkeypatch.setattr(performance.sys, "platform", "linux")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(performance, "_read_cpuinfo", lambda: f"processor\t: 0\nflags\t\t: {AVX512_BF16}\n")
    assert performance.bf16_native("cpu") == (True, "the CPU has avx512_bf16")
    assert performance.bf16_native(torch.device("cpu"))[0] is True
    # Capped below AVX512_CORE_BF16, oneDNN emulates bf16 (measured: 129 ms against 31 ms a conv).
    for cap, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        got, why = performance.bf16_native("cpu")
        assert got is native, (cap, why)
        assert native or f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in why
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(performance, "_read_cpuinfo", lambda: f"flags\t\t: {AVX2}\n")
    assert performance.bf16_native("cpu")[0] is False


def test_bf16_native_without_flags_is_not_native(monkeypatch):
    monkeypatch.setattr(performance, "_read_cpuinfo", lambda: None)
    monkeypatch.setattr(performance.sys, "platform", "linux")
    assert performance.bf16_native("cpu") == (False, "no x86 flags in /proc/cpuinfo (not an x86 CPU, or unreadable): "
                                                     "assuming emulated")
    # aarch64 Linux: a "Features" line, no "flags": unknown, so float32
    monkeypatch.setattr(performance, "_read_cpuinfo", lambda: "processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert performance.bf16_native("cpu")[0] is False
    monkeypatch.setattr(performance.sys, "platform", "darwin")
    native, why = performance.bf16_native("cpu")
    assert not native and "darwin" in why
    assert performance.bf16_native("meta")[0] is False


def test_bf16_native_on_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert performance.bf16_native("cuda") == (False, "CUDA is not available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Fake GPU")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        native, why = performance.bf16_native("cuda:0")
        assert native is supported and "Fake GPU" in why


def test_this_machine_answers():
    native, why = performance.bf16_native("cpu")
    assert isinstance(native, bool) and why


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,choice", [([], "auto"), (["--bf16"], "on"), (["--bf16", "on"], "on"),
                                          (["--bf16", "off"], "off"), (["--no-bf16"], "off"),
                                          (["--bf16", "auto"], "auto"), (["--bf16", "--seed", "3"], "on")])
def test_bf16_option_parses(argv, choice):
    assert T.build_parser().parse_args(["--out", "r"] + argv).bf16 == choice


def test_bf16_option_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        T.build_parser().parse_args(["--out", "r", "--bf16", "yes"])
    assert "--bf16" in capsys.readouterr().err


@pytest.mark.parametrize("choice,native,expect", [("auto", True, "bf16"), ("auto", False, "float32"),
                                                    ("on", True, "bf16"), ("on", False, "bf16"),
                                                    ("off", True, "float32"), ("off", False, "float32")])
def test_choose_precision(choice, native, expect):
    precision, reason = T.choose_precision(choice, native, "because", "lavae")
    assert precision == expect
    assert reason == ("--bf16 auto: because" if choice == "auto" else f"--bf16 {choice}")
    assert T.choose_precision(choice, native, "because", "baseline")[0] == "float32"
    with pytest.raises(ValueError, match="--bf16"):
        T.choose_precision("maybe", native, "because")


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine does (``machine.native = True``) or does not compute bf16 natively, and
    record the bf16 setting each LAVAE model is accelerated with."""
    state = type("Machine", (), {"native": True, "bf16": []})()
    monkeypatch.setattr(performance, "bf16_native",
                        lambda device: (True, "fake: native") if state.native else (False, "fake: emulated"))
    real = LAVAE.accelerate

    def accelerate(self, **kw):
        state.bf16.append(kw.get("bf16", False))
        return real(self, **kw)

    monkeypatch.setattr(LAVAE, "accelerate", accelerate)
    return state


def _recorded(run):
    with open(os.path.join(run, "args.json")) as f:
        args = json.load(f)
    return args["precision"], args["precision_reason"], load_checkpoint(run)["args"]["precision"]


@pytest.mark.parametrize("native,argv,precision,reason", [
    (True, [], "bf16", "--bf16 auto: fake: native"),
    (False, [], "float32", "--bf16 auto: fake: emulated"),
    (True, ["--no-bf16"], "float32", "--bf16 off"),
])
def test_cli_resolves_and_records_the_precision(tmp_path, capsys, machine, native, argv, precision, reason):
    machine.native = native
    run = str(tmp_path / "run")
    assert T.main(TINY + ["--out", run] + argv) == 0
    assert machine.bf16 == [precision == "bf16"]  # the model trained in it
    assert _recorded(run) == (precision, reason, precision)
    err = capsys.readouterr().err
    assert f"precision: {precision} ({reason})" in err and "warning" not in err


def test_cli_bf16_on_where_emulated_warns(tmp_path, capsys, machine):
    machine.native = False
    run = str(tmp_path / "run")
    assert T.main(TINY + ["--out", run, "--bf16"]) == 0
    assert machine.bf16 == [True]
    assert _recorded(run)[0] == "bf16"
    err = capsys.readouterr().err
    assert "precision: bf16 (--bf16 on)" in err
    assert f"warning: training in bf16 where it is emulated (fake: emulated); expect steps ~" \
           f"{performance.BF16_EMULATED_SLOWDOWN}x slower" in err


def test_resume_keeps_the_recorded_precision(tmp_path, capsys, machine):
    run = str(tmp_path / "run")
    machine.native = True
    assert T.main(TINY + ["--out", run, "--stop-at", "1"]) == 0
    assert load_checkpoint(run)["args"]["precision"] == "bf16"
    # The run moves to a machine without native bf16: auto would pick float32 there, the resumed
    # run keeps bf16 (and warns that it is emulated here).
    machine.native, machine.bf16 = False, []
    capsys.readouterr()
    assert T.main(TINY + ["--out", run, "--resume"]) == 0
    assert machine.bf16[-1] is True
    state = load_checkpoint(run)
    assert state["step"] == 2 and state["args"]["precision"] == "bf16"
    err = capsys.readouterr().err
    assert "precision: bf16 (recorded in the checkpoint: --resume keeps it, without detecting the machine again)" in err
    assert "warning: training in bf16 where it is emulated" in err
    assert _recorded(run)[0] == "bf16"
    # An explicit choice against the record is refused, naming both.
    with pytest.raises(SystemExit):
        T.main(TINY + ["--out", run, "--resume", "--bf16", "off"])
    assert "--resume with --bf16 off, but the run was trained in bf16" in capsys.readouterr().err
    # ... one that agrees is fine.
    assert T.main(TINY + ["--out", run, "--resume", "--bf16", "on"]) == 0


def test_resume_of_a_run_from_before_the_record(tmp_path, capsys, machine):
    """Checkpoints written before --bf16 auto hold only the flag (a bool): it is the record."""
    run = str(tmp_path / "run")
    machine.native = False
    assert T.main(TINY + ["--out", run, "--stop-at", "1"]) == 0
    path = os.path.join(run, "checkpoint.pt")
    state = load_checkpoint(path)
    for key in ("precision", "precision_reason"):
        del state["args"][key]
    state["args"]["bf16"] = True  # the old store_true flag
    save_checkpoint(path, state)
    machine.bf16 = []
    assert T.main(TINY + ["--out", run, "--resume"]) == 0
    assert machine.bf16[-1] is True and load_checkpoint(run)["args"]["precision"] == "bf16"
    assert T.recorded_precision({}) == "float32" and T.recorded_precision({"bf16": False}) == "float32"


def test_bf16_heads_are_float32_so_the_counter_sees_no_rounding_ties():
    # Under bf16 autocast the nets run in bf16 but the heads' last convolutions in float32: a bf16
    # h_loc sits on bf16's grid (steps of ~0.06 nats near a peak), neighbouring pixels of a broad
    # peak tie, and every tie is one more counted 3×3 maximum (see LAVAE._inference_nets).
    torch.manual_seed(0)
    model = LAVAE(channels=1, canvas=(16, 16), sprite_size=5, width=8, sprite_width=40).eval()
    model.accelerate(bf16=True)
    x = (torch.rand(4, 1, 16, 16) < 0.2).float()
    with torch.no_grad():
        h_app, h_loc, _ = model.encode(x)
        raw = h_loc / model.gamma_for(16, 16)
    for name, v in (("h_app", h_app), ("h_loc", raw)):
        assert v.dtype == torch.float32
        on_grid = (v == v.bfloat16().float()).float().mean().item()
        assert on_grid < 0.5, f"{name}: {on_grid:.0%} of the values lie on bf16's grid (a bf16 head)"
