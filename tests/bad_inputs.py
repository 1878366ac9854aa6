"""Bad inputs for the reliability tests: broken CLT folders, models, data files and flags.

Every case is a function ``case(world, folder) -> list[str]`` that builds its broken input under
``folder`` (copying from a good tiny world) and returns the ``pie prune`` arguments that use it.
``CASES`` maps a case name to (builder, regex the one-line error must match). The regexes ask
for the *thing* that is wrong (file, field, shape, pair) and, where it matters, what was expected.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

#: Keep subprocesses from oversubscribing the (shared) CPU cores.
SUBPROCESS_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@dataclass
class CLIResult:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if "error" in ln.lower()]


def run_cli(args: list[str], timeout: float = 120, cwd: str | Path | None = None) -> CLIResult:
    """``python -m pie_lib <args>`` in a fresh process."""
    import os

    env = {**os.environ, **SUBPROCESS_ENV}
    p = subprocess.run(
        [sys.executable, "-m", "pie_lib", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )
    return CLIResult(list(args), p.returncode, p.stdout, p.stderr)


def prune_args(world, out: Path, *, model=None, clt=None, data=None, extra: list[str] | None = None) -> list[str]:
    """``pie prune`` on the tiny world, small and quiet (every pair of the data file); a flag in
    ``extra`` replaces the default one (a flag given twice is itself an error)."""
    base = ["--model", str(model or world.model_dir), "--clt", str(clt or world.clt_dir),
            "--data", str(data or world.pairs_path), "--methods", "fap,random", "--k", "5",
            "--seeds", "0", "--out", str(out), "--device", "cpu"]  # fmt: skip
    extra = list(extra or [])
    given = {x.split("=", 1)[0] for x in extra if x.startswith("--")}
    kept = [x for i in range(0, len(base), 2) if base[i] not in given for x in base[i : i + 2]]
    return ["prune", *kept, "--no-progress", *extra]


# ----------------------------------------------------------------------------- builders
def copy_clt(world, folder: Path) -> Path:
    dst = folder / "clt"
    shutil.copytree(world.clt_dir, dst)
    return dst


def copy_model(world, folder: Path) -> Path:
    dst = folder / "model"
    shutil.copytree(world.model_dir, dst)
    return dst


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(ln + "\n" for ln in lines))
    return path


def pair_line(clean="w1 w2 w3 w4 w5 w6", corr="w1 w2 w9 w4 w8 w6", io=" w30", s=" w22", **extra) -> str:
    return json.dumps({"text_clean": clean, "text_corr": corr, "io_clean": io, "s_clean": s, **extra})


def _rewrite(path: Path, fn: Callable[[dict], dict]) -> None:
    save_file({k: v.contiguous() for k, v in fn(load_file(str(path))).items()}, str(path))


def clt_missing_layer(world, folder):
    c = copy_clt(world, folder)
    (c / "W_dec_1.safetensors").unlink()
    return prune_args(world, folder / "out", clt=c)


def clt_missing_last_layer(world, folder):
    c = copy_clt(world, folder)
    (c / "W_enc_2.safetensors").unlink()
    return prune_args(world, folder / "out", clt=c)


def clt_truncated(world, folder):
    c = copy_clt(world, folder)
    p = c / "W_dec_0.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return prune_args(world, folder / "out", clt=c)


def clt_corrupt_header(world, folder):
    c = copy_clt(world, folder)
    p = c / "W_enc_1.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + p.read_bytes()[24:])
    return prune_args(world, folder / "out", clt=c)


def clt_empty_file(world, folder):
    c = copy_clt(world, folder)
    (c / "W_enc_0.safetensors").write_bytes(b"")
    return prune_args(world, folder / "out", clt=c)


def clt_wrong_shape(world, folder):
    c = copy_clt(world, folder)
    _rewrite(c / "W_dec_1.safetensors", lambda t: {"W_dec_1": t["W_dec_1"][:, :1]})
    return prune_args(world, folder / "out", clt=c)


def clt_wrong_enc_shape(world, folder):
    c = copy_clt(world, folder)
    _rewrite(c / "W_enc_2.safetensors", lambda t: {**t, "b_enc_2": t["b_enc_2"][:-3]})
    return prune_args(world, folder / "out", clt=c)


def clt_missing_key(world, folder):
    c = copy_clt(world, folder)
    _rewrite(c / "W_enc_0.safetensors", lambda t: {k: v for k, v in t.items() if k != "b_dec_0"})
    return prune_args(world, folder / "out", clt=c)


def clt_nan_encoder(world, folder):
    c = copy_clt(world, folder)

    def f(t):
        t["W_enc_1"][3, 2] = float("nan")
        return t

    _rewrite(c / "W_enc_1.safetensors", f)
    return prune_args(world, folder / "out", clt=c)


def clt_inf_decoder(world, folder):
    c = copy_clt(world, folder)

    def f(t):
        t["W_dec_0"][5, 1, 3] = float("inf")
        return t

    _rewrite(c / "W_dec_0.safetensors", f)
    return prune_args(world, folder / "out", clt=c)


def clt_nan_threshold(world, folder):
    c = copy_clt(world, folder)

    def f(t):
        t["threshold_2"][0] = float("nan")
        return t

    _rewrite(c / "W_enc_2.safetensors", f)
    return prune_args(world, folder / "out", clt=c)


def clt_int_dtype(world, folder):
    c = copy_clt(world, folder)
    _rewrite(c / "W_enc_0.safetensors", lambda t: {**t, "W_enc_0": (t["W_enc_0"] * 100).to(torch.int32)})
    return prune_args(world, folder / "out", clt=c)


def clt_int_decoder(world, folder):
    c = copy_clt(world, folder)
    _rewrite(c / "W_dec_1.safetensors", lambda t: {"W_dec_1": t["W_dec_1"].to(torch.int16)})
    return prune_args(world, folder / "out", clt=c)


def clt_unknown_kind(world, folder):
    c = copy_clt(world, folder)
    (c / "config.yaml").write_text("model_kind: sparse_autoencoder\n")
    return prune_args(world, folder / "out", clt=c)


def clt_bad_yaml(world, folder):
    c = copy_clt(world, folder)
    (c / "config.yaml").write_text("model_kind: [unclosed\n  : :\n")
    return prune_args(world, folder / "out", clt=c)


def clt_is_a_file(world, folder):
    return prune_args(world, folder / "out", clt=world.clt_dir / "W_enc_0.safetensors")


def clt_no_such_folder(world, folder):
    return prune_args(world, folder / "out", clt=folder / "nope")


def clt_empty_folder(world, folder):
    (folder / "empty").mkdir()
    return prune_args(world, folder / "out", clt=folder / "empty")


def model_small_d(world, folder):
    from conftest import WORDS

    from pie_lib.models.random_init import save_random_model

    m = save_random_model(folder / "model", "llama", WORDS, hidden_size=16, intermediate_size=32)
    return prune_args(world, folder / "out", model=m)


def model_two_layers(world, folder):
    from conftest import WORDS

    from pie_lib.models.random_init import save_random_model

    m = save_random_model(folder / "model", "llama", WORDS, num_hidden_layers=2)
    return prune_args(world, folder / "out", model=m)


def model_unknown_arch(world, folder):
    """A tiny random ``MistralForCausalLM``: transformers knows it, pie_lib has no ArchSpec for it."""
    from conftest import WORDS
    from transformers import MistralConfig, MistralForCausalLM

    from pie_lib.models.random_init import word_tokenizer

    tok = word_tokenizer(WORDS)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    MistralForCausalLM(cfg).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return prune_args(world, folder / "out", model=folder / "model")


def model_broken_config(world, folder):
    m = copy_model(world, folder)
    (m / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
    return prune_args(world, folder / "out", model=m)


def model_config_wrong_values(world, folder):
    m = copy_model(world, folder)
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # 32 is not divisible by 5
    (m / "config.json").write_text(json.dumps(cfg))
    return prune_args(world, folder / "out", model=m)


def model_no_tokenizer(world, folder):
    m = copy_model(world, folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (m / f).unlink(missing_ok=True)
    return prune_args(world, folder / "out", model=m)


def model_no_weights(world, folder):
    m = copy_model(world, folder)
    (m / "model.safetensors").unlink()
    return prune_args(world, folder / "out", model=m)


def model_truncated_weights(world, folder):
    m = copy_model(world, folder)
    p = m / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    return prune_args(world, folder / "out", model=m)


def model_nan_weights(world, folder):
    m = copy_model(world, folder)

    def f(t):
        key = next(k for k in t if "layers.1.mlp.down_proj" in k)
        t[key][0, 0] = float("nan")
        return t

    _rewrite(m / "model.safetensors", f)
    return prune_args(world, folder / "out", model=m)


def model_no_such_folder(world, folder):
    return prune_args(world, folder / "out", model=folder / "nope")


def data_bad_json(world, folder):
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", [pair_line(), "{not json"]))


def data_missing_key(world, folder):
    line = json.dumps({"text_clean": "w1 w2 w3", "text_corr": "w1 w2 w4", "io_clean": " w5"})
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", [line]))


def data_wrong_type(world, folder):
    line = json.dumps({"text_clean": "w1 w2 w3", "text_corr": "w1 w2 w4", "io_clean": 5, "s_clean": " w6"})
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", [line]))


def data_not_object(world, folder):
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", ['["w1", "w2"]']))


def data_empty(world, folder):
    (folder / "d.jsonl").write_text("")
    return prune_args(world, folder / "out", data=folder / "d.jsonl")


def data_blank_lines(world, folder):
    (folder / "d.jsonl").write_text("\n  \n\n")
    return prune_args(world, folder / "out", data=folder / "d.jsonl")


def data_binary(world, folder):
    (folder / "d.jsonl").write_bytes(b"\xff\xfe\x00garbage\x80\x81\n")
    return prune_args(world, folder / "out", data=folder / "d.jsonl")


def data_no_such_file(world, folder):
    return prune_args(world, folder / "out", data=folder / "nope.jsonl")


def data_is_a_folder(world, folder):
    return prune_args(world, folder / "out", data=folder)


def data_corrupt_shorter(world, folder):
    lines = [pair_line(), pair_line(clean="w1 w2 w3 w4 w5 w6 w7", corr="w1 w2 w3 w4")]
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", lines))


def data_empty_target(world, folder):
    lines = [pair_line(), pair_line(io="   ")]
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", lines))


def data_too_long(world, folder):
    lines = [pair_line(), pair_line(clean=" ".join(["w1"] * 200), corr=" ".join(["w2"] * 200))]
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", lines))


def toy_not_built(world, folder):
    from pie_lib import toy

    if toy.toy_clt_path("llama").exists():
        return prune_args(world, folder / "out", model="toy:nosuch", clt="toy:nosuch")
    return prune_args(world, folder / "out", model="toy", clt="toy")


def data_all_too_short(world, folder):
    lines = [pair_line(clean="w1 w2", corr="w3 w4"), pair_line(clean="   ", corr="w3")]
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", lines), extra=["--min-tokens", "4"])


def k_zero(world, folder):
    return prune_args(world, folder / "out", extra=["--k", "0"])


def k_negative(world, folder):
    return prune_args(world, folder / "out", extra=["--k=-5"])


def k_negative_spaced(world, folder):
    return prune_args(world, folder / "out", extra=["--k", "-5"])


def k_not_a_number(world, folder):
    return prune_args(world, folder / "out", extra=["--k", "ten"])


def k_frac_too_big(world, folder):
    return prune_args(world, folder / "out", extra=["--k-frac", "1.5"])


def methods_empty(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", ","])


def methods_duplicate(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", "fap,random,fap"])


def methods_unknown(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", "fap,magic"])


def seeds_empty(world, folder):
    return prune_args(world, folder / "out", extra=["--seeds", ","])


def n_negative(world, folder):
    return prune_args(world, folder / "out", extra=["--n=-2"])


def batch_size_zero(world, folder):
    return prune_args(world, folder / "out", extra=["--batch-size", "0"])


def chunk_zero(world, folder):
    return prune_args(world, folder / "out", extra=["--chunk", "0"])


def gamma_out_of_range(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", "fap-signal", "--gamma", "0.7"])


def dtype_unknown(world, folder):
    return prune_args(world, folder / "out", extra=["--dtype", "float77"])


def device_unknown(world, folder):
    return prune_args(world, folder / "out", extra=["--device", "tpu:9"])


def device_cuda_absent(world, folder):
    if torch.cuda.is_available():  # pragma: no cover - only meaningful without a GPU
        return prune_args(world, folder / "out", extra=["--device", "cuda:99"])
    return prune_args(world, folder / "out", extra=["--device", "cuda"])


def out_is_a_file(world, folder):
    (folder / "out").write_text("I am a file\n")
    return prune_args(world, folder / "out")


def out_under_a_file(world, folder):
    (folder / "f").write_text("I am a file\n")
    return prune_args(world, folder / "f" / "out")


def out_corrupt_config(world, folder):
    (folder / "out").mkdir()
    (folder / "out" / "config.json").write_text('{"identity": {"model": ')
    return prune_args(world, folder / "out")


def out_other_config(world, folder):
    """A results folder written by a different configuration (here: another CLT)."""
    (folder / "out").mkdir()
    (folder / "out" / "config.json").write_text(
        json.dumps({"identity": {"model": str(world.model_dir), "clt": "/some/other/clt"}})
    )
    return prune_args(world, folder / "out")


def out_corrupt_results(world, folder):
    """A results.jsonl whose middle line is garbage (not a torn last line): refuse, say which line."""
    args = prune_args(world, folder / "out")
    from pie_lib.cli import build_parser, prune_config_from_args

    cfg = prune_config_from_args(build_parser().parse_args(args))
    (folder / "out").mkdir()
    identity = json.loads(json.dumps(cfg.identity(), default=str))
    (folder / "out" / "config.json").write_text(json.dumps({"identity": identity}))
    (folder / "out" / "results.jsonl").write_text('{"method": "fap"}\n#garbage#\n{"method": "fap"}\n')
    return args


#: name -> (builder, regex that the one-line error must match (case-insensitive))
CASES: dict[str, tuple[Callable, str]] = {
    "clt_missing_layer": (clt_missing_layer, r"layer.*\[1\].*missing"),
    "clt_missing_last_layer": (clt_missing_last_layer, r"(encoder layers.*decoder layers|layer.*missing)"),
    "clt_truncated": (clt_truncated, r"W_dec_0\.safetensors.*(truncated|corrupt)"),
    "clt_corrupt_header": (clt_corrupt_header, r"W_enc_1\.safetensors.*(corrupt|not a readable|truncated)"),
    "clt_empty_file": (clt_empty_file, r"W_enc_0\.safetensors.*(truncated|corrupt)"),
    "clt_wrong_shape": (clt_wrong_shape, r"W_dec_1 has shape \(48, 1, 32\), expected \(48, 2, 32\)"),
    "clt_wrong_enc_shape": (clt_wrong_enc_shape, r"b_enc_2 has shape \(45,\), expected \(48,\)"),
    "clt_missing_key": (clt_missing_key, r"W_enc_0\.safetensors.*missing tensor 'b_dec_0'"),
    "clt_nan_encoder": (clt_nan_encoder, r"W_enc.*NaN or Inf"),
    "clt_inf_decoder": (clt_inf_decoder, r"W_dec_0.*NaN or Inf"),
    "clt_nan_threshold": (clt_nan_threshold, r"threshold.*NaN or Inf"),
    "clt_int_dtype": (clt_int_dtype, r"W_enc_0 has dtype torch\.int32, expected a floating-point dtype"),
    "clt_int_decoder": (clt_int_decoder, r"W_dec_1.*unsupported dtype I16"),
    "clt_unknown_kind": (clt_unknown_kind, r"config\.yaml: model_kind 'sparse_autoencoder' is not supported"),
    "clt_bad_yaml": (clt_bad_yaml, r"config\.yaml.*invalid YAML"),
    "clt_is_a_file": (clt_is_a_file, r"W_enc_0\.safetensors is a file"),
    "clt_no_such_folder": (clt_no_such_folder, r"CLT .*nope.*no such local folder"),
    "clt_empty_folder": (clt_empty_folder, r"empty/config\.yaml: missing"),
    "model_small_d": (model_small_d, r"d_model 32 != model d_model 16"),
    "model_two_layers": (model_two_layers, r"CLT has 3 layers but model .* has 2"),
    "model_unknown_arch": (model_unknown_arch, r"'MistralForCausalLM' is not supported.*LlamaForCausalLM"),
    "model_broken_config": (model_broken_config, r"model .*config\.json.*(could not be read|not a valid JSON)"),
    "model_config_wrong_values": (model_config_wrong_values, r"model .*(config|weights)"),
    "model_no_tokenizer": (model_no_tokenizer, r"model .*tokenizer"),
    "model_no_weights": (model_no_weights, r"model .*weights"),
    "model_truncated_weights": (model_truncated_weights, r"model .*weights"),
    "model_nan_weights": (model_nan_weights, r"NaN/Inf logits on pair\(s\) \[0.*weights are corrupt"),
    "model_no_such_folder": (model_no_such_folder, r"model .*nope.*(could not be read|no such)"),
    "data_bad_json": (data_bad_json, r"d\.jsonl:2: invalid JSON"),
    "data_missing_key": (data_missing_key, r"d\.jsonl:1: missing key.*s_clean"),
    "data_wrong_type": (data_wrong_type, r"d\.jsonl:1: .*io_clean.*non-empty strings"),
    "data_not_object": (data_not_object, r"d\.jsonl:1: expected a JSON object"),
    "data_empty": (data_empty, r"d\.jsonl.*no pairs"),
    "data_blank_lines": (data_blank_lines, r"d\.jsonl.*no pairs"),
    "data_binary": (data_binary, r"d\.jsonl.*(UTF-8|invalid JSON)"),
    "data_no_such_file": (data_no_such_file, r"nope\.jsonl.*no such file"),
    "data_is_a_folder": (data_is_a_folder, r"is a (folder|directory)"),
    "data_corrupt_shorter": (data_corrupt_shorter, r"pair 1: corrupted prompt has 5 tokens but the clean prompt has 8"),
    "data_empty_target": (data_empty_target, r"pair 1: io_clean '   ' tokenises to nothing"),
    "data_too_long": (data_too_long, r"pair 1: clean prompt has 201 tokens, more than the model's 128 positions"),
    "toy_not_built": (toy_not_built, r"(toy world .* is not built.*pie_lib\.toy\.build|unknown toy arch 'nosuch')"),
    "data_all_too_short": (data_all_too_short, r"no usable pairs.*min_tokens"),
    "k_zero": (k_zero, r"budgets \[0\] must be positive"),
    "k_negative": (k_negative, r"budgets \[-5\] must be positive"),
    "k_negative_spaced": (k_negative_spaced, r"(--k.*expected one argument|budgets \[-5\] must be positive)"),
    "k_not_a_number": (k_not_a_number, r"--k.*comma-separated integers.*'ten'"),
    "k_frac_too_big": (k_frac_too_big, r"fractions \[1\.5\] must be in \(0, 1\]"),
    "methods_empty": (methods_empty, r"no methods given"),
    "methods_duplicate": (methods_duplicate, r"\['fap'\] listed twice"),
    "methods_unknown": (methods_unknown, r"unknown method.*'magic'.*choose from"),
    "seeds_empty": (seeds_empty, r"no seeds"),
    "n_negative": (n_negative, r"--n.*-2"),
    "batch_size_zero": (batch_size_zero, r"--batch-size.*0.*positive"),
    "chunk_zero": (chunk_zero, r"--chunk.*0.*positive"),
    "gamma_out_of_range": (gamma_out_of_range, r"gamma=0\.7 must be in \(0, 0\.5\)"),
    "dtype_unknown": (dtype_unknown, r"dtype.*float77"),
    "device_unknown": (device_unknown, r"device.*tpu:9"),
    "device_cuda_absent": (device_cuda_absent, r"device.*cuda.*(not available|no such)"),
    "out_is_a_file": (out_is_a_file, r"--out .*out.* is a file"),
    "out_under_a_file": (out_under_a_file, r"--out .*f.*(is a file|not a directory)"),
    "out_corrupt_config": (out_corrupt_config, r"config\.json.*(corrupt|invalid JSON)"),
    "out_other_config": (out_other_config, r"different configuration.*clt"),
    "out_corrupt_results": (out_corrupt_results, r"results\.jsonl:2: corrupt line"),
}


# ----------------------------------------------------------------------------- issue 13: nothing silent
def _clt_config(world, folder, text: str | bytes | None):
    c = copy_clt(world, folder)
    if text is None:
        (c / "config.yaml").unlink()
    else:
        (c / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return prune_args(world, folder / "out", clt=c)


def clt_no_config(world, folder):
    return _clt_config(world, folder, None)


def clt_config_no_kind(world, folder):
    return _clt_config(world, folder, "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")


def clt_config_no_hooks(world, folder):
    return _clt_config(world, folder, "model_kind: cross_layer_transcoder\n")


def clt_config_other_hook(world, folder):
    return _clt_config(
        world,
        folder,
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_pre\nfeature_output_hook: hook_mlp_out\n",
    )


def clt_config_topk_no_k(world, folder):
    return _clt_config(
        world,
        folder,
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
        "feature_output_hook: hook_mlp_out\nactivation: topk\n",
    )


def clt_config_topk_with_thresholds(world, folder):
    return _clt_config(
        world,
        folder,
        "model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
        "feature_output_hook: hook_mlp_out\nactivation: topk\nk: 4\n",
    )


def clt_config_not_utf8(world, folder):
    return _clt_config(world, folder, b"model_kind: \xff\xfe cross\n")


def clt_config_a_list(world, folder):
    return _clt_config(world, folder, "- model_kind\n- cross_layer_transcoder\n")


def clt_hub_id_offline(world, folder):
    return prune_args(world, folder / "out", clt="pie-test/no-such-clt")


def model_hub_id_offline(world, folder):
    return prune_args(world, folder / "out", model="pie-test/no-such-model")


def model_no_bos(world, folder):
    m = copy_model(world, folder)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return prune_args(world, folder / "out", model=m)


def _data(world, folder, lines, extra=None):
    return prune_args(world, folder / "out", data=write_jsonl(folder / "d.jsonl", lines), extra=extra)


def data_multi_token_target(world, folder):
    return _data(world, folder, [pair_line(), pair_line(io=" w3 w17")])


def data_corrupt_longer(world, folder):
    return _data(world, folder, [pair_line(), pair_line(corr="w1 w2 w9 w4 w8 w6 w7")])


def data_corrupt_longer_with_last_flag(world, folder):
    """--target-token last does not also allow cutting: each flag covers one behaviour."""
    return _data(
        world,
        folder,
        [pair_line(io=" w3 w17"), pair_line(corr="w1 w2 w9 w4 w8 w6 w7")],
        extra=["--target-token", "last"],
    )


def data_same_targets(world, folder):
    return _data(world, folder, [pair_line(), pair_line(io=" w7", s=" w7")])


def data_identical_prompts(world, folder):
    return _data(world, folder, [pair_line(), pair_line(corr="w1 w2 w3 w4 w5 w6")])


def data_whitespace_prompt(world, folder):
    return _data(world, folder, [pair_line(), pair_line(clean="   ", corr="   ")])


def data_duplicate_key(world, folder):
    line = '{"text_clean": "w1 w2", "text_clean": "w3 w4", "text_corr": "w1 w5", "io_clean": " w6", "s_clean": " w7"}'
    return _data(world, folder, [pair_line(), line])


def data_bom(world, folder):
    (folder / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + (pair_line() + "\n").encode())
    return prune_args(world, folder / "out", data=folder / "d.jsonl")


def data_lone_surrogate(world, folder):
    return _data(
        world, folder, ['{"text_clean": "w1 \\ud800 w2", "text_corr": "w1 w3 w2", "io_clean": " w4", "s_clean": " w5"}']
    )


def data_deep_nesting(world, folder):
    return _data(world, folder, [pair_line(), "[" * 50_000])


def data_null_target(world, folder):
    return _data(
        world, folder, [json.dumps({"text_clean": "w1 w2", "text_corr": "w1 w3", "io_clean": None, "s_clean": " w5"})]
    )


def data_number_prompt(world, folder):
    return _data(
        world, folder, [json.dumps({"text_clean": 12, "text_corr": "w1 w3", "io_clean": " w4", "s_clean": " w5"})]
    )


def data_not_utf8_line3(world, folder):
    (folder / "d.jsonl").write_bytes(((pair_line() + "\n") * 2).encode() + b'{"text_clean": "w1 \xe9"}\n')
    return prune_args(world, folder / "out", data=folder / "d.jsonl")


def data_n_above_file(world, folder):
    return prune_args(world, folder / "out", extra=["--n", "50"])


def data_empty_path(world, folder):
    args = prune_args(world, folder / "out")
    args[args.index("--data") + 1] = ""
    return args


def n_zero(world, folder):
    return prune_args(world, folder / "out", extra=["--n", "0"])


def n_not_a_number(world, folder):
    return prune_args(world, folder / "out", extra=["--n", "all"])


def out_empty(world, folder):
    args = prune_args(world, folder / "out")
    args[args.index("--out") + 1] = ""
    return args


def out_read_only(world, folder):
    return prune_args(world, Path("/sys/pie_out"))


def seeds_duplicate(world, folder):
    return prune_args(world, folder / "out", extra=["--seeds", "0,1,0"])


def seeds_not_ints(world, folder):
    return prune_args(world, folder / "out", extra=["--seeds", "0,1.5"])


def k_duplicate(world, folder):
    return prune_args(world, folder / "out", extra=["--k", "5,10,5"])


def k_frac_zero(world, folder):
    return prune_args(world, folder / "out", extra=["--k-frac", "0"])


def flag_given_twice(world, folder):
    return [*prune_args(world, folder / "out"), "--k", "10"]  # --k 5 is already there


def flag_unknown(world, folder):
    return prune_args(world, folder / "out", extra=["--frobnicate", "3"])


def target_token_unknown(world, folder):
    return prune_args(world, folder / "out", extra=["--target-token", "first"])


def method_wrong_case(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", "FAP"])


def batch_size_not_int(world, folder):
    return prune_args(world, folder / "out", extra=["--batch-size", "eight"])


def lambda_nan(world, folder):
    return prune_args(world, folder / "out", extra=["--methods", "fap-synergy", "--lambda-syn", "nan"])


def dtype_integer(world, folder):
    return prune_args(world, folder / "out", extra=["--dtype", "int8"])


def device_bad_index(world, folder):
    return prune_args(world, folder / "out", extra=["--device", "cuda:x"])


def data_and_task(world, folder):
    return prune_args(world, folder / "out", extra=["--task", "ioi"])


CASES.update(
    {
        "clt_no_config": (clt_no_config, r"clt/config\.yaml: missing; pie_lib does not guess.*model_kind"),
        "clt_config_no_kind": (clt_config_no_kind, r"config\.yaml: no model_kind; add 'model_kind: cross_layer"),
        "clt_config_no_hooks": (clt_config_no_hooks, r"config\.yaml: no feature_input_hook.*add 'feature_input_hook"),
        "clt_config_other_hook": (clt_config_other_hook, r"feature_input_hook 'hook_resid_pre' is not supported"),
        "clt_config_topk_no_k": (clt_config_topk_no_k, r"activation topk needs k, a positive integer"),
        "clt_config_topk_with_thresholds": (clt_config_topk_with_thresholds, r"activation topk, but the weights store"),
        "clt_config_not_utf8": (clt_config_not_utf8, r"config\.yaml: not UTF-8"),
        "clt_config_a_list": (clt_config_a_list, r"config\.yaml: expected a mapping.*got list"),
        "clt_hub_id_offline": (clt_hub_id_offline, r"CLT 'pie-test/no-such-clt': weights not reachable"),
        "model_hub_id_offline": (model_hub_id_offline, r"model 'pie-test/no-such-model': weights not reachable"),
        "model_no_bos": (model_no_bos, r"tokenizer of model .* has no BOS token"),
        "data_multi_token_target": (
            data_multi_token_target,
            r"d\.jsonl:2: pair 1: io_clean ' w3 w17' is 2 tokens.*--target-token last",
        ),
        "data_corrupt_longer": (
            data_corrupt_longer,
            r"d\.jsonl:2: pair 1: corrupted prompt has 8 tokens but the clean prompt has 7.*"
            r"--cut-corrupted",
        ),
        "data_corrupt_longer_with_last_flag": (data_corrupt_longer_with_last_flag, r"d\.jsonl:2: .*--cut-corrupted"),
        "data_same_targets": (data_same_targets, r"d\.jsonl:2: pair 1: io_clean ' w7' and s_clean ' w7' are the same"),
        "data_identical_prompts": (
            data_identical_prompts,
            r"d\.jsonl:2: pair 1: the clean and corrupted prompts are the "
            r"same tokens",
        ),
        "data_whitespace_prompt": (
            data_whitespace_prompt,
            r"d\.jsonl:2: pair 1: the clean prompt '   ' tokenises to "
            r"nothing",
        ),
        "data_duplicate_key": (data_duplicate_key, r"d\.jsonl:2: key 'text_clean' is given twice"),
        "data_bom": (data_bom, r"d\.jsonl:1: invalid JSON \(Unexpected UTF-8 BOM"),
        "data_lone_surrogate": (data_lone_surrogate, r"d\.jsonl:1: text_clean holds an invalid Unicode escape"),
        "data_deep_nesting": (data_deep_nesting, r"d\.jsonl:2: invalid JSON"),
        "data_null_target": (data_null_target, r"d\.jsonl:1: key\(s\) \['io_clean'\] must be non-empty strings"),
        "data_number_prompt": (data_number_prompt, r"d\.jsonl:1: key\(s\) \['text_clean'\] must be non-empty strings"),
        "data_not_utf8_line3": (data_not_utf8_line3, r"d\.jsonl:3: not UTF-8 text"),
        "data_n_above_file": (data_n_above_file, r"--n 50: .*pairs\.jsonl holds only 8 pair\(s\)"),
        "data_empty_path": (data_empty_path, r"--data '' is empty"),
        "n_zero": (n_zero, r"--n 0: the number of pairs must be a positive integer"),
        "n_not_a_number": (n_not_a_number, r"--n.*invalid int value: 'all'"),
        "out_empty": (out_empty, r"--out '' is empty"),
        "out_read_only": (out_read_only, r"--out /sys/pie_out: /sys is not writable"),
        "seeds_duplicate": (seeds_duplicate, r"--seeds: \[0\] listed twice"),
        "seeds_not_ints": (seeds_not_ints, r"--seeds.*comma-separated integers.*'0,1\.5'"),
        "k_duplicate": (k_duplicate, r"--k: \[5\] listed twice"),
        "k_frac_zero": (k_frac_zero, r"fractions \[0(\.0)?\] must be in \(0, 1\]"),
        "flag_given_twice": (flag_given_twice, r"--k given twice \(--k \.\.\. --k\); give it once"),
        "flag_unknown": (flag_unknown, r"unrecognized arguments: --frobnicate"),
        "target_token_unknown": (target_token_unknown, r"--target-token.*invalid choice: 'first'"),
        "method_wrong_case": (method_wrong_case, r"unknown method.*'FAP'"),
        "batch_size_not_int": (batch_size_not_int, r"--batch-size.*invalid int value: 'eight'"),
        "lambda_nan": (lambda_nan, r"--lambda-syn nan: must be a finite number"),
        "dtype_integer": (dtype_integer, r"--dtype 'int8' is not a floating-point torch dtype"),
        "device_bad_index": (device_bad_index, r"--device 'cuda:x' is not a device"),
        "data_and_task": (data_and_task, r"--task.*not allowed with argument --data"),
    }
)


def clt_for_another_model(world, folder):
    """The toy Llama and GPT-2 share d_model and depth: only the CLT's model_name tells them apart."""
    return prune_args(world, folder / "out", model="toy", clt="toy:gpt2")


def data_seed_with_data(world, folder):
    return prune_args(world, folder / "out", extra=["--data-seed", "3"])


CASES.update(
    {
        "clt_for_another_model": (
            clt_for_another_model,
            r"CLT .*gpt2.* was trained for model 'pie_lib\.toy:gpt2'.*not 'pie_lib\.toy:llama'; pass --model toy:gpt2",
        ),
        "data_seed_with_data": (data_seed_with_data, r"--data-seed seeds generated pairs.*drop it"),
    }
)


def param_unknown_key(world, folder):
    return prune_args(world, folder / "out", extra=["--param", "foo=bar"])


def param_typo(world, folder):
    return prune_args(world, folder / "out", extra=["--param", "ep_step=3"])  # fap does not read it: still a typo


def param_bad_value(world, folder):
    return prune_args(world, folder / "out", extra=["--param", "ep_steps=many"])


CASES.update(
    {
        "param_unknown_key": (param_unknown_key, r"--param \['foo'\]: no method reads this key; known prefixes"),
        "param_typo": (param_typo, r"unknown parameter 'ep_step'; valid keys: .*ep_steps"),
        "param_bad_value": (param_bad_value, r"parameter ep_steps='many' is not a valid int"),
    }
)
