"""Every user mistake, as a new user makes it: one line on stderr, exit 2, no traceback, the file:line, key, flag or
URI named, nothing written (the run folder and its lease included), no secret echoed. One row per case, grouped by
the families the README lists; then the valid edge cases that must still pass.

Runs `ftdist.cli.main` in this process (no spawn). Ray never starts: run_training and run_sweep are replaced by a
failing stub, so a case that got past the checks made before Ray would fail loudly here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest
import yaml

from ftdist.cli import main
from tests.conftest import tiny_job_dict

HF_TOKEN = "hf_Zq8XkP2vLm4Rt7Ws9Yb3Nc6Jd1Ge5Hf0"
AWS_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY9q"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMyJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZnRkaXN0In0.c2lnbmF0dXJl"
CONN = f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={AWS_SECRET}==;EndpointSuffix=core.windows.net"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
ENV_SECRETS = {"HF_TOKEN": "hf_EnvToken0123456789abcdefXYZ", "WANDB_API_KEY": "wandb-env-0a1b2c3d4e5f6a7b8c9d",
               "AWS_SECRET_ACCESS_KEY": "env/Secret+Key0123456789abcdefghijKLMN", "RAY_AUTH_TOKEN": "ray-env-token-5e6f7a8b"}
CLOSED = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused at once


def _row(i: int, **kw: Any) -> dict:
    return {"prompt": f"Write {i} in words:", "completion": f" number {i}", **kw}


def _rows(n: int = 40, bad: Optional[tuple[int, Any]] = None) -> str:
    """n prompt/completion rows as JSONL; `bad` = (1-based line, row object or raw line text) replaces one."""
    lines = [json.dumps(_row(i)) for i in range(n)]
    if bad is not None:
        line, row = bad
        lines[line - 1] = row if isinstance(row, str) else json.dumps(row)
    return "\n".join(lines) + "\n"


def _parquet(rows: list) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue().to_pybytes()


def _lines(rows: list, bad: Optional[tuple[int, Any]] = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if bad is not None:
        lines[bad[0] - 1] = json.dumps(bad[1])
    return "\n".join(lines) + "\n"


def _pairs(bad: Optional[tuple[int, Any]] = None) -> str:
    """40 preference rows as JSONL; `bad` = (1-based line, row) replaces one."""
    return _lines([{"prompt": f"Write {i} in words:", "chosen": f" number {i}", "rejected": f" number {i + 1}"}
                   for i in range(40)], bad)


def _labelled(bad: Optional[tuple[int, Any]] = None) -> str:
    return _lines([{"text": f"text {i}", "label": ("neg", "pos")[i % 2]} for i in range(40)], bad)


def _objective(name: str, **sections: Any) -> Callable:
    """The tiny job under another objective, on one data file (no eval split)."""
    def change(j: dict) -> None:
        j["objective"] = name
        j["data"] = {"train": "rows.jsonl", "max_length": 48}
        for k, v in sections.items():
            j[k] = {**j.get(k, {}), **v}
    return change


def _chat(messages: list, n: int = 40, line: int = 3) -> str:
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [json.dumps({"messages": good}) for _ in range(n)]
    rows[line - 1] = json.dumps({"messages": messages})
    return "\n".join(rows) + "\n"


@dataclass
class Case:
    """argv uses {job} for the job file; `job` changes the tiny job (a function of its dict, or of its YAML text)."""

    id: str
    family: str
    argv: list
    expect: str
    job: Optional[Callable] = None
    text: Optional[Callable[[str], Union[str, bytes]]] = None
    files: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    secret: Optional[str] = None


def _set(section: str, **kw: Any) -> Callable:
    def change(j: dict) -> None:
        j.setdefault(section, {})
        j[section].update(kw)
    return change


def _top(**kw: Any) -> Callable:
    return lambda j: j.update(kw)


def _data(**kw: Any) -> Callable:
    return _set("data", **kw)


def _model(**kw: Any) -> Callable:
    return lambda j: j["model"].update(kw)


def _cfg(**kw: Any) -> Callable:
    return lambda j: j["model"]["from_config"].update(kw)


def _k8s(**kw: Any) -> Callable:
    return lambda j: j.update(kubernetes={"image": "registry.example.com/ftdist:0.1", **kw})


def _sweep(**kw: Any) -> Callable:
    def change(j: dict) -> None:
        j["eval"] = {"every_n_steps": 2, "max_batches": 2}
        j["sweep"] = {"space": {"optim.lr": [1e-3, 1e-2]}, **kw}
    return change


def _append(extra: str) -> Callable[[str], str]:
    return lambda text: text + extra


def _replace(old: str, new: str) -> Callable[[str], str]:
    def change(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return change


def _line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


ON_S3 = _set("checkpoint", storage="s3://bucket/runs")  # what a submitted job needs (a relative folder is refused)
V, T, TU = ["validate", "{job}"], ["train", "{job}"], ["tune", "{job}"]
S3ENV = {"AWS_ENDPOINT_URL": CLOSED, "AWS_ACCESS_KEY_ID": "ftdisttest", "AWS_SECRET_ACCESS_KEY": "ftdisttestsecret"}
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

CASES = [
    # -- YAML: crashes, hangs and vague places --------------------------------------------------------------------
    Case("recursive-alias", "yaml", V, r"job\.yaml:1: malformed YAML: recursive alias", text=lambda t: "lol: &x [*x]\n"),
    Case("recursive-alias-map", "yaml", V, r"job\.yaml:\d+: malformed YAML: recursive alias",
         text=_append("extra: &m\n  self: *m\n")),
    Case("billion-laughs", "yaml", V, r"job\.yaml:\d+: malformed YAML: aliases expand to more than",
         text=lambda t: BILLION_LAUGHS),
    Case("huge-file", "yaml", V, r"job\.yaml: 5\.\d MB is too large for a job file",
         text=lambda t: t + "# " + "x" * 5_000_000 + "\n"),
    Case("deep-nesting", "yaml", V, r"job\.yaml(:\d+)?: malformed YAML: nested more than",
         text=lambda t: "a: " + "[" * 3000 + "]" * 3000 + "\n"),
    Case("moderate-nesting", "yaml", V, r"job\.yaml:\d+: malformed YAML: nested more than 64",
         text=lambda t: "a: " + "[" * 80 + "]" * 80 + "\n"),
    Case("unclosed-quote", "yaml", V, r"job\.yaml:7: malformed YAML: .*quoted scalar that is never closed",
         text=lambda t: "\n".join(t.splitlines()[:6] + ["    num_hidden_layers: '4"] + t.splitlines()[7:]) + "\n"),
    Case("unclosed-bracket", "yaml", V, r"job\.yaml:\d+: malformed YAML",
         text=_replace("  stage: 2", "  stage: [2, 3")),
    Case("nul-byte", "yaml", V, r"job\.yaml:4: control character U\+0000",
         text=lambda t: t.replace("    model_type: llama", "    model_type: lla\x00ma")),
    Case("latin1-byte", "yaml", V, r"job\.yaml:5: not UTF-8 text \(byte 0xe9",
         text=lambda t: t.encode().replace(b"    vocab_size: 320", b"    vocab_size: 320 # caf\xe9")),
    Case("tab-indent", "yaml", V, r"job\.yaml:\d+: malformed YAML: .*'\\t'",
         text=_replace("  stage: 2", "\tstage: 2")),
    Case("duplicate-method", "yaml", V, r"job\.yaml:\d+: duplicate key method \(first on line 23",
         text=_append("method: lora\n")),
    Case("duplicate-nested", "yaml", V, r"job\.yaml:\d+: duplicate key optim\.lr \(first on line 27",
         text=_replace("  lr: 0.003\n", "  lr: 0.003\n  lr: 0.1\n")),
    Case("duplicate-in-alias", "yaml", V, r"duplicate key", text=_append("x: &x {a: 1, a: 2}\n")),
    Case("two-documents", "yaml", V, r"job\.yaml:\d+: malformed YAML: but found another document",
         text=_append("---\nname: other\n")),
    Case("empty-file", "yaml", V, r"job\.yaml: the job file must be a YAML mapping", text=lambda t: ""),
    Case("comments-only", "yaml", V, r"must be a YAML mapping", text=lambda t: "# nothing yet\n"),
    Case("top-level-list", "yaml", V, r"must be a YAML mapping", text=lambda t: "- name: x\n"),
    Case("top-level-scalar", "yaml", V, r"must be a YAML mapping", text=lambda t: "hello\n"),
    Case("python-tag", "yaml", V, r"job\.yaml:\d+: malformed YAML: could not determine a constructor",
         text=_append("x: !!python/object/apply:os.system ['true']\n")),
    Case("unhashable-key", "yaml", V, r"job\.yaml:\d+: malformed YAML: found unhashable key",
         text=_append("? [a, b]\n: 1\n")),
    Case("job-file-missing", "yaml", ["validate", "nope.yaml"], r"nope\.yaml: job file not found"),
    Case("job-file-is-folder", "yaml", ["validate", "store"], r"store: job file not found \(it is a folder\)",
         files={"store/keep": ""}),
    # -- schema: values of the wrong kind ---------------------------------------------------------------------
    Case("stage-yes", "schema", V, r":25: zero\.stage: got the YAML boolean true", job=_set("zero", stage=True)),
    Case("workers-no", "schema", V, r"resources\.num_workers: got the YAML boolean false",
         job=_set("resources", num_workers=False)),
    Case("lr-true", "schema", V, r"optim\.lr: got the YAML boolean", job=_set("optim", lr=True)),
    Case("lr-inf", "schema", V, r"optim\.lr: .*finite number", text=_replace("lr: 0.003", "lr: .inf")),
    Case("lr-nan", "schema", V, r"optim\.lr: .*finite number", text=_replace("lr: 0.003", "lr: .nan")),
    Case("epochs-inf", "schema", V, r"optim\.epochs: .*finite number",
         text=_replace("max_steps: 8", "epochs: .inf")),
    Case("lr-negative", "schema", V, r"optim\.lr: Input should be greater than 0", job=_set("optim", lr=-1e-4)),
    Case("lr-word", "schema", V, r"optim\.lr: Input should be a valid number", job=_set("optim", lr="fast")),
    Case("seed-negative", "schema", V, r"optim\.seed: Input should be greater than or equal to 0",
         job=_set("optim", seed=-1)),
    Case("seed-negative-eval-split", "schema", T, r"optim\.seed: Input should be greater than or equal to 0",
         job=lambda j: (j["optim"].update(seed=-1), j["data"].pop("eval"), j["data"].update(eval_fraction=0.1))),
    Case("seed-too-big", "schema", V, r"optim\.seed: Input should be less than or equal to 4294967295",
         job=_set("optim", seed=2**64)),
    Case("seed-fraction", "schema", V, r"optim\.seed: .*integer", job=_set("optim", seed=1.5)),
    Case("max-steps-zero", "schema", V, r"optim\.max_steps: Input should be greater than or equal to 1",
         job=_set("optim", max_steps=0)),
    Case("max-steps-fraction", "schema", V, r"optim\.max_steps: .*integer", job=_set("optim", max_steps=2.5)),
    Case("global-batch-zero", "schema", V, r"optim\.global_batch_size", job=_set("optim", global_batch_size=0)),
    Case("gpus-negative", "schema", V, r"resources\.gpus_per_worker", job=_set("resources", gpus_per_worker=-1)),
    Case("max-length-tiny", "schema", V, r"data\.max_length", job=_data(max_length=4)),
    Case("format-unknown", "schema", V, r"data\.format: Input should be 'text', 'prompt_completion' or 'chat'",
         job=_data(format="jsonl")),
    Case("method-unknown", "schema", V, r":23: method: Input should be 'full', 'freeze' or 'lora'",
         job=_top(method="qlora")),
    Case("name-spaces", "schema", V, r":1: name: .*lowercase", job=_top(name="My Job")),
    Case("name-number", "schema", V, r"name: Input should be a valid string", job=_top(name=123)),
    Case("name-missing", "schema", V, r"job\.yaml: name: required key is missing", job=lambda j: j.pop("name")),
    Case("model-missing", "schema", V, r"model: required key is missing", job=lambda j: j.pop("model")),
    Case("model-empty", "schema", V, r"model\.name_or_path: set exactly one of", job=_top(model={})),
    Case("model-both", "schema", V, r"model\.name_or_path: set exactly one of", job=_model(name_or_path="gpt2")),
    Case("from-config-no-type", "schema", V, r"model\.from_config: model\.from_config needs a model_type",
         job=lambda j: j["model"]["from_config"].pop("model_type")),
    Case("from-config-typo", "schema", V, r":\d+: model\.from_config\.hiden_size: not a setting of transformers' llama "
         r"config \(did you mean hidden_size\?\)", job=_cfg(hiden_size=64)),
    Case("from-config-typo-train", "schema", T, r"model\.from_config\.hiden_size: not a setting",
         job=_cfg(hiden_size=64)),
    Case("from-config-type", "schema", V, r":4: model\.from_config\.model_type: unknown transformers model type "
         r"'lama' \(did you mean llama\?\)", job=_cfg(model_type="lama")),
    Case("dtype-fp8", "schema", V, r"model\.dtype: Input should be", job=_model(dtype="fp8")),
    Case("lora-rank-zero", "schema", V, r"lora\.rank: Input should be greater than or equal to 1",
         job=_top(method="lora", lora={"rank": 0})),
    Case("lora-dropout-one", "schema", V, r"lora\.dropout: Input should be less than 1",
         job=_top(method="lora", lora={"dropout": 1.0})),
    Case("lora-targets-number", "schema", V, r"lora\.target_modules", job=_top(method="lora", lora={"target_modules": 5})),
    Case("betas-one", "schema", V, r"optim\.betas", job=_set("optim", betas=[0.9])),
    Case("betas-range", "schema", V, r"optim\.betas: Value error, betas must be in|optim\.betas: betas must be in",
         job=_set("optim", betas=[1.0, 0.9])),
    Case("keep-last-zero", "schema", V, r"checkpoint\.keep_last", job=_set("checkpoint", keep_last=0)),
    Case("part-size-small", "schema", V, r"checkpoint\.upload\.part_size_mb",
         job=_set("checkpoint", upload={"part_size_mb": 1})),
    Case("shard-size-nonsense", "schema", V, r"export\.max_shard_size: not a size",
         job=_set("export", max_shard_size="5 parsecs")),
    Case("logging-zero", "schema", V, r"logging\.every_n_steps", job=_set("logging", every_n_steps=0)),
    Case("section-scalar", "schema", V, r":26: optim: expected a mapping of keys \(a section\), got a number",
         job=_top(optim=5)),
    Case("section-list", "schema", V, r"zero: expected a mapping of keys \(a section\), got a list",
         job=_top(zero=[2])),
    # -- schema: misspelled keys (the unknown key first, with the likely one) --------------------------------------
    Case("typo-trian", "keys", V, r":\d+: data\.trian: unknown key \(did you mean train\?\)",
         job=lambda j: j["data"].update(trian=j["data"].pop("train"))),
    Case("typo-optimizer", "keys", V, r"optimizer: unknown key \(did you mean optim\?\)",
         job=lambda j: j.update(optimizer=j.pop("optim"))),
    Case("typo-every-n-step", "keys", V, r"checkpoint\.every_n_step: unknown key \(did you mean every_n_steps\?\)",
         job=lambda j: j["checkpoint"].update(every_n_step=j["checkpoint"].pop("every_n_steps"))),
    Case("typo-deep", "keys", V, r"checkpoint\.upload\.part_sise_mb: unknown key \(did you mean part_size_mb\?\)",
         job=_set("checkpoint", upload={"part_sise_mb": 8})),
    Case("typo-no-match", "keys", V, r"banana: unknown key$", job=_top(banana=1)),
    Case("typo-sweep", "keys", V, r"sweep\.serch: unknown key \(did you mean search\?\)",
         job=_sweep(serch="grid")),
    Case("typo-k8s", "keys", V, r"kubernetes\.namespce: unknown key \(did you mean namespace\?\)",
         job=_k8s(namespce="ml")),
    # -- cross-field rules name a field and its line ----------------------------------------------------------------
    Case("lora-on-full", "cross", V, r":\d+: lora: lora options are set but method is 'full'",
         job=_top(lora={"rank": 4})),
    Case("freeze-on-lora", "cross", V, r":\d+: freeze: freeze options are set", job=_top(method="lora",
                                                                                          freeze={})),
    Case("batch-not-divisible", "cross", V, r":29: optim\.global_batch_size: .*not a multiple",
         job=_set("optim", global_batch_size=15)),
    Case("fp16-on-cpu", "cross", V, r":17: model\.dtype: model\.dtype fp16 needs GPUs", job=_model(dtype="fp16")),
    Case("liger-on-cpu", "cross", V, r"model\.use_liger_kernel: .*needs GPUs", job=_model(use_liger_kernel=True)),
    Case("eval-twice", "cross", V, r"data\.eval_fraction: set data\.eval or data\.eval_fraction",
         job=_data(eval_fraction=0.1)),
    Case("completion-only-text", "cross", V, r"data\.completion_only_loss: .*needs format",
         job=_data(format="text", completion_only_loss=True)),
    Case("keep-best-no-eval", "cross", V, r"checkpoint\.keep_best_by: .*needs data\.eval",
         job=lambda j: (j["data"].pop("eval"), j["checkpoint"].update(keep_best_by="eval_loss"))),
    Case("keep-best-bad-name", "cross", V, r"checkpoint\.keep_best_by: .*metric name",
         job=_set("checkpoint", keep_best_by="eval loss!")),
    Case("eval-cadence-no-eval", "cross", V, r":\d+: eval\.every_n_steps: .*needs eval data",
         job=lambda j: (j["data"].pop("eval"), j["eval"].update(every_n_steps=2))),
    Case("steps-and-epochs", "cross", V, r"optim\.max_steps: set exactly one of", job=_set("optim", epochs=1)),
    Case("no-steps", "cross", V, r"optim\.max_steps: set exactly one of",
         job=lambda j: j["optim"].pop("max_steps")),
    Case("offload-params-zero2", "cross", V, r"zero\.offload_params: .*needs zero\.stage 3",
         job=_set("zero", offload_params="cpu")),
    Case("offload-optim-zero0", "cross", V, r"zero\.offload_optimizer: .*needs zero\.stage 1",
         job=_set("zero", stage=0, offload_optimizer="cpu")),
    Case("freeze-nothing", "cross", V, r"freeze\.train_top_layers: freeze trains nothing",
         job=_top(method="freeze", freeze={"train_top_layers": 0, "train_head": False})),
    Case("sse-local", "cross", V, r"checkpoint\.encryption\.sse: .*s3:// storage only",
         job=_set("checkpoint", encryption={"sse": "AES256"})),
    Case("kms-without-sse", "cross", V, r"checkpoint\.encryption\.kms_key_id: kms_key_id needs sse",
         job=_set("checkpoint", encryption={"kms_key_id": "alias/x"})),
    # -- locations: files, folders, URIs --------------------------------------------------------------------------
    Case("train-missing", "paths", V, r"data\.train: .*no/such\.jsonl: no such file", job=_data(train="/no/such.jsonl")),
    Case("eval-missing", "paths", V, r"data\.eval: .*: no such file", job=_data(eval="missing.jsonl")),
    Case("train-tilde-missing", "paths", V, r"data\.train: .*home/none\.jsonl: no such file",
         job=_data(train="~/none.jsonl")),
    Case("train-s3-no-bucket", "paths", V, r"data\.train: no bucket in the s3:// URI",
         job=_data(train="s3:///x.jsonl")),
    Case("train-s3-bad-bucket", "paths", V, r"data\.train: 'Bad_Bucket' is not a valid S3 bucket name",
         job=_data(train="s3://Bad_Bucket/x.jsonl")),
    Case("train-gs", "paths", V, r"data\.train: unsupported URI scheme gs://", job=_data(train="gs://b/x.jsonl")),
    Case("train-https", "paths", V, r"data\.train: unsupported URI scheme https://",
         job=_data(train="https://example.com/x.jsonl")),
    Case("train-one-slash", "paths", V, r"data\.train: s3:/ has one slash; did you mean s3://",
         job=_data(train="s3:/bucket/x.jsonl")),
    Case("model-s3-bad-bucket", "paths", V, r"model\.name_or_path: 'Bad_Bucket' is not a valid S3 bucket",
         job=_model(from_config=None, tokenizer=None, name_or_path="s3://Bad_Bucket/x")),
    Case("model-local-missing", "paths", V, r"model\.name_or_path: .*no-such-model: no such directory",
         job=_model(from_config=None, tokenizer=None, name_or_path="./no-such-model")),
    Case("model-not-a-hub-id", "paths", V, r"model\.name_or_path: .*a/b/c: no such directory",
         job=_model(from_config=None, tokenizer=None, name_or_path="a/b/c")),
    Case("tokenizer-typo", "paths", V, r"model\.tokenizer: tokenizr: no such folder next to the job file \(did you mean "
                                       r"tokenizer\?\)", job=_model(tokenizer="tokenizr"), files={"tokenizer/x": ""}),
    Case("tokenizer-typo-train", "paths", T, r"model\.tokenizer: tokenizr: no such folder",
         job=_model(tokenizer="tokenizr"), files={"tokenizer/x": ""}),
    Case("tokenizer-folder-empty", "paths", T, r"model\.tokenizer: .*emptytok: no tokenizer in this folder",
         job=_model(tokenizer="emptytok"), files={"emptytok/readme.txt": "x"}),
    Case("model-folder-no-config", "paths", V, r"model\.name_or_path: .*mymodel: no config\.json here",
         job=_model(from_config=None, tokenizer=None, name_or_path="./mymodel"), files={"mymodel/weights.bin": ""}),
    Case("mix-negative-weight", "schema", V, r":\d+: data\.train\.0\.weight: Input should be greater than or equal "
                                             r"to 0", job=_data(eval=None, train=[{"path": "t.jsonl", "weight": -1}]),
         files={"t.jsonl": _rows()}),
    Case("mix-all-zero", "cross", V, r":\d+: data\.train: every source has weight 0",
         job=_data(eval=None, train=[{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl", "weight": 0}]),
         files={"a.jsonl": _rows(), "b.jsonl": _rows()}),
    Case("mix-same-name", "cross", V, r":\d+: data\.train\.1: sources 0 and 1 are both named 't' \(after their file "
                                      r"names\); give each a distinct name",
         job=_data(eval=None, train=[{"path": "a/t.jsonl"}, {"path": "b/t.jsonl"}]),
         files={"a/t.jsonl": _rows(), "b/t.jsonl": _rows()}),
    Case("mix-with-data-eval", "cross", V, r"data\.eval: a mixture's held-out rows are per source",
         job=_data(eval="t.jsonl", train=[{"path": "t.jsonl"}]), files={"t.jsonl": _rows()}),
    Case("train-a-number", "schema", V, r"data\.train: expected a path, or a list of sources .*got a number",
         job=_data(train=5)),
    Case("cache-is-a-file", "paths", T, r"data\.cache: .*afile/cache: .*afile is a file, not a folder",
         job=_data(cache="afile/cache"), files={"afile": "x"}),
    Case("schema-differs", "rows", T, r"pq/b\.parquet: its columns differ from .*pq/a\.parquet's \(missing "
                                      r"completion; extra answer\); the files of one data set need one schema",
         job=_data(train="pq"),
         files={"pq/a.parquet": _parquet([{"prompt": f"q{i}", "completion": " a"} for i in range(40)]),
                "pq/b.parquet": _parquet([{"prompt": f"q{i}", "answer": " a"} for i in range(40)])}),
    Case("prepare-processes", "cross", ["data", "prepare", "{job}", "--processes", "0"],
         r"--processes 0: must be at least 1"),
    Case("prepare-cache-off", "cross", ["data", "prepare", "{job}"], r"data\.cache: off: nothing is prepared",
         job=_data(cache="off")),
    Case("storage-is-a-file", "paths", T, r"checkpoint\.storage: .*afile/runs: .*afile is a file, not a folder",
         job=_set("checkpoint", storage="afile/runs"), files={"afile": "x"}),
    Case("train-empty-string", "paths", V, r":19: data\.train: empty \(give a path or URI\)", job=_data(train="")),
    Case("model-empty-string", "paths", V, r"model\.name_or_path: empty", job=_model(from_config=None, tokenizer=None,
                                                                                   name_or_path="")),
    Case("train-padded", "paths", V, r"data\.train: has spaces or a line break at its start or end",
         job=_data(train=" train.jsonl"), files={"train.jsonl": _rows()}),
    Case("storage-gs", "paths", V, r"checkpoint\.storage: unsupported URI scheme gs://",
         job=_set("checkpoint", storage="gs://b/runs")),
    Case("storage-no-bucket", "paths", V, r"checkpoint\.storage: no bucket", job=_set("checkpoint", storage="s3://")),
    Case("storage-credentials", "paths", V, r"checkpoint\.storage: credentials do not belong in the storage URI",
         job=_set("checkpoint", storage=f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/runs"), secret=AWS_SECRET),
    Case("tracking-credentials", "secrets", V, r"tracking\.mlflow\.tracking_uri: credentials do not go into the "
                                                r"tracking URI", secret=AWS_SECRET,
         job=_set("tracking", mlflow={"tracking_uri": f"https://ml:{AWS_SECRET}@mlflow.example.com"})),
    Case("tracking-token-query", "secrets", V, r"tracking\.mlflow\.tracking_uri: credentials do not go", secret=HF_TOKEN,
         job=_set("tracking", mlflow={"tracking_uri": f"https://mlflow.example.com/?token={HF_TOKEN}"})),
    Case("tracking-scheme", "paths", V, r"tracking\.mlflow\.tracking_uri: ftp://m/x: unsupported scheme ftp://",
         job=_set("tracking", mlflow={"tracking_uri": "ftp://m/x"})),
    Case("tracking-no-host", "paths", V, r"tracking\.mlflow\.tracking_uri: http:///x: no host",
         job=_set("tracking", mlflow={"tracking_uri": "http:///x"})),
    Case("reference-missing", "paths", V, r"eval\.reference\.0: .*upstream/nope\.jsonl: no such file or directory",
         job=_set("eval", reference=["upstream/nope.jsonl"])),
    Case("reference-bad-row", "rows", T, r"ref\.jsonl:3: bad row: missing field 'text'",
         job=_set("eval", reference=["ref.jsonl"]),
         files={"ref.jsonl": _lines([{"text": f"doc {i}"} for i in range(5)], (3, {"body": "doc"}))}),
    Case("reference-duplicate", "cross", V, r"eval\.reference\.1: two reference sets are named ref",
         job=_set("eval", reference=["ref.jsonl", {"path": "ref.jsonl"}]), files={"ref.jsonl": '{"text": "a"}\n'}),
    Case("generate-unknown-module", "storage", T, r"eval\.generate\.function: nosuchmod_q:score: no module named "
                                                  r"'nosuchmod_q'",
         job=_set("eval", generate={"function": "nosuchmod_q:score"})),
    Case("generate-unknown-function", "storage", T, r"eval\.generate\.function: .*metrics\.py:scor: .*metrics\.py has "
                                                    r"no function 'scor'",
         job=_set("eval", generate={"function": "metrics.py:scor"}),
         files={"metrics.py": "def score(p, r):\n    return 1\n"}),
    Case("generate-function-file-missing", "paths", V, r"eval\.generate\.function: .*/nometrics\.py: no such file",
         job=_set("eval", generate={"function": "nometrics.py:score"})),
    Case("generate-function-syntax", "schema", V, r"eval\.generate\.function: .*must be module:function",
         job=_set("eval", generate={"function": "score"})),
    Case("generate-bad-regex", "schema", V, r"eval\.generate\.metrics: item 0: regex: not a regular expression",
         job=_set("eval", generate={"metrics": [{"regex": "(unclosed"}]})),
    Case("generate-metric-typo", "schema", V, r"eval\.generate\.metrics: item 1: 'exact' is not a metric \(did you "
                                              r"mean exact_match\?\)",
         job=_set("eval", generate={"metrics": ["contains", "exact"]})),
    Case("generate-text-format", "cross", V, r"eval\.generate: eval\.generate needs prompts and reference answers",
         job=lambda j: (_data(format="text")(j), _set("eval", generate={})(j))),
    Case("generate-no-rows", "cross", V, r"eval\.generate: eval\.generate needs rows with prompts",
         job=lambda j: (_data(eval=None, eval_fraction=0.1)(j), _set("eval", generate={})(j))),
    Case("generate-bad-row", "rows", T, r"gen\.jsonl:2: bad row for eval\.generate: field 'completion' must be a string",
         job=_set("eval", generate={"data": "gen.jsonl"}),
         files={"gen.jsonl": _lines([_row(1), {"prompt": "Write 2 in words:"}])}),
    Case("reference-on-reward", "cross", V, r"eval\.reference: eval\.reference measures next-token loss",
         job=lambda j: (_objective("reward")(j), _set("eval", reference=["rows.jsonl"])(j)),
         files={"rows.jsonl": _pairs()}),
    Case("model-credentials", "paths", V, r"model\.name_or_path: credentials do not belong",
         job=_model(from_config=None, tokenizer=None, name_or_path=f"s3://user:{AWS_SECRET}@bucket/m"),
         secret=AWS_SECRET),
    # -- data rows, found before Ray starts (train) -----------------------------------------------------------
    Case("row-invalid-json", "rows", T, r"train\.jsonl:2: bad row: invalid JSON", job=_data(train="train.jsonl"),
         files={"train.jsonl": _rows(bad=(2, '{"prompt": "a"'))}),
    Case("row-missing-field", "rows", T, r"train\.jsonl:5: bad row: missing field 'completion'",
         job=_data(train="train.jsonl"), files={"train.jsonl": _rows(bad=(5, {"prompt": "x"}))}),
    Case("row-wrong-type", "rows", T, r"train\.jsonl:3: bad row: field 'completion' must be str, got int",
         job=_data(train="train.jsonl"), files={"train.jsonl": _rows(bad=(3, _row(1, completion=5)))}),
    Case("row-null", "rows", T, r"train\.jsonl:3: bad row: field 'completion' must be str, got NoneType",
         job=_data(train="train.jsonl"), files={"train.jsonl": _rows(bad=(3, _row(1, completion=None)))}),
    Case("row-empty-completion", "rows", T, r"train\.jsonl:4: bad row: field 'completion' is empty",
         job=_data(train="train.jsonl"), files={"train.jsonl": _rows(bad=(4, _row(1, completion="")))}),
    Case("row-list", "rows", T, r"train\.jsonl:2: bad row: row is not a JSON object", job=_data(train="train.jsonl"),
         files={"train.jsonl": _rows(bad=(2, [1, 2]))}),
    Case("row-text-missing", "rows", T, r"train\.jsonl:1: bad row: missing field 'text'",
         job=_data(train="train.jsonl", format="text"), files={"train.jsonl": _rows()}),
    Case("eval-row-bad", "rows", T, r"eval\.jsonl:3: bad row: invalid JSON", job=_data(eval="eval.jsonl"),
         files={"eval.jsonl": _rows(bad=(3, "{oops"))}),
    Case("chat-unknown-role", "rows", T, r"chat\.jsonl:3: bad row: message 1 has role 'asistant' \(did you mean "
                                         r"assistant\?\)",
         job=_data(train="chat.jsonl", format="chat", chat_template=CHAT_TEMPLATE),
         files={"chat.jsonl": _chat([{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}])}),
    Case("chat-no-assistant", "rows", T, r"chat\.jsonl:3: bad row: conversation has no assistant message",
         job=_data(train="chat.jsonl", format="chat", chat_template=CHAT_TEMPLATE),
         files={"chat.jsonl": _chat([{"role": "user", "content": "hi"}])}),
    Case("chat-no-content", "rows", T, r"chat\.jsonl:3: bad row: message 0 needs string 'role' and 'content'",
         job=_data(train="chat.jsonl", format="chat", chat_template=CHAT_TEMPLATE),
         files={"chat.jsonl": _chat([{"role": "user"}, {"role": "assistant", "content": "x"}])}),
    Case("chat-empty", "rows", T, r"chat\.jsonl:3: bad row: conversation has no messages",
         job=_data(train="chat.jsonl", format="chat", chat_template=CHAT_TEMPLATE), files={"chat.jsonl": _chat([])}),
    Case("chat-template-refuses", "rows", T, r"chat\.jsonl:3: bad row: the chat template refused this conversation: "
                                             r"roles must alternate",
         job=_data(train="chat.jsonl", format="chat", chat_template=(
             "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('roles must alternate') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")),
         files={"chat.jsonl": _chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                     {"role": "assistant", "content": "c"}])}),
    Case("chat-template-syntax", "rows", T, r"data\.chat_template: not a valid Jinja template \(template line 1: "
         r"unexpected '}'\)", job=_data(train="chat.jsonl", format="chat",
                                        chat_template="{% for m in messages %}{{ m['content'] }"),
         files={"chat.jsonl": _chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])}),
    Case("too-few-rows", "rows", T, r"fewer than one global batch", job=_data(train="train.jsonl"),
         files={"train.jsonl": _rows(3)}),
    Case("all-rows-skipped", "rows", T, r"train\.jsonl: no usable training examples \(0 rows, 0 tokens, 40 bad rows "
                                        r"skipped \(first: .*train\.jsonl:1: missing field 'text'\)",
         job=_data(train="train.jsonl", format="text", on_bad_row="skip"), files={"train.jsonl": _rows()}),
    Case("data-not-utf8", "rows", T, r"train\.jsonl: not UTF-8 text", job=_data(train="train.jsonl"),
         files={"train.jsonl": b"\xff\xfe{}\n"}),
    Case("data-empty-file", "rows", T, r"train\.jsonl: no usable training examples", job=_data(train="train.jsonl"),
         files={"train.jsonl": ""}),
    Case("data-folder-empty", "rows", T, r"data: folder has no \.jsonl/\.parquet files", job=_data(train="data"),
         files={"data/readme.txt": "x"}),
    Case("data-parquet-corrupt", "rows", T, r"train\.parquet: not a readable Parquet file",
         job=_data(train="train.parquet"), files={"train.parquet": b"PAR1garbage"}),
    Case("pair-missing-chosen", "rows", T, r"rows\.jsonl:4: bad row: missing field 'chosen'",
         job=_objective("dpo"), files={"rows.jsonl": _pairs((4, {"prompt": "p", "rejected": " r"}))}),
    Case("pair-identical", "rows", T, r"rows\.jsonl:2: bad row: chosen and rejected are identical",
         job=_objective("reward"), files={"rows.jsonl": _pairs((2, {"chosen": " same", "rejected": " same"}))}),
    Case("pair-margin-text", "rows", T, r"rows\.jsonl:6: bad row: field 'margin' must be a number, got str",
         job=_objective("reward"), files={"rows.jsonl": _pairs((6, {"chosen": "a", "rejected": "b", "margin": "1"}))}),
    Case("label-outside-set", "rows", T, r"rows\.jsonl:5: bad row: label 'meh' is not one of classification\.labels "
                                         r"\(neg, pos\)",
         job=_objective("classification", classification={"labels": ["neg", "pos"]}),
         files={"rows.jsonl": _labelled((5, {"text": "so so", "label": "meh"}))}),
    Case("labels-one-only", "rows", T, r"rows\.jsonl: a classifier needs two or more labels; field 'label' has 1 "
                                       r"distinct value \('pos'\)",
         job=_objective("classification"), files={"rows.jsonl": _lines([{"text": "t", "label": "pos"}] * 40)}),
    # -- --set overrides -----------------------------------------------------------------------------------------
    Case("set-no-equals", "overrides", [*V, "--set", "optim.lr"], r"--set optim\.lr: expected KEY\.PATH=VALUE"),
    Case("set-secret-colon", "overrides", [*V, "--set", f"kubernetes.env.HF_TOKEN:{HF_TOKEN}"],
         r"--set kubernetes\.env\.HF_TOKEN\.\.\.: expected KEY\.PATH=VALUE", secret=HF_TOKEN),
    Case("set-bare-secret", "overrides", [*V, "--set", HF_TOKEN], r"--set \(value not shown\)", secret=HF_TOKEN),
    Case("set-secret-env", "overrides", [*V, "--set", f"kubernetes.env.HF_TOKEN={HF_TOKEN}"],
         r"kubernetes\.env: HF_TOKEN looks like a secret", secret=HF_TOKEN),
    Case("set-unknown", "overrides", [*V, "--set", "optim.lrr=1e-4"], r"optim\.lrr: unknown key \(did you mean lr\?\)"),
    Case("set-section-scalar", "overrides", [*V, "--set", "optim=5"], r"optim: expected a mapping"),
    Case("set-through-scalar", "overrides", [*V, "--set", "optim.lr.x=1"], r"override optim\.lr\.x: lr is not a section"),
    Case("set-empty-segment", "overrides", [*V, "--set", "optim..lr=1"], r"--set optim\.\.lr: expected KEY\.PATH"),
    Case("set-bad-name", "overrides", [*V, "--set", "name=Bad Name"], r"name: .*lowercase"),
    Case("set-yes", "overrides", [*V, "--set", "zero.stage=yes"], r"zero\.stage: got the YAML boolean true"),
    Case("set-bomb", "overrides", [*V, "--set", "optim.lr=" + BILLION_LAUGHS.replace("\n", "\n")],
         r"optim\.lr: Input should be a valid number"),
    # -- secrets typed where they do not belong ------------------------------------------------------------------
    Case("k8s-secret-name", "secrets", V, r"kubernetes\.env: HF_TOKEN looks like a secret",
         job=_k8s(env={"HF_TOKEN": HF_TOKEN}), secret=HF_TOKEN),
    Case("k8s-conn-string", "secrets", V, r"kubernetes\.env: AZURE_STORAGE has a value that looks like a credential",
         job=_k8s(env={"AZURE_STORAGE": CONN}), secret=AWS_SECRET),
    Case("k8s-token-value", "secrets", V, r"kubernetes\.env: HUB has a value that looks like a credential",
         job=_k8s(env={"HUB": HF_TOKEN}), secret=HF_TOKEN),
    Case("k8s-jwt-value", "secrets", V, r"kubernetes\.env: SA has a value that looks like a credential",
         job=_k8s(env={"SA": JWT}), secret=JWT[:40]),
    Case("k8s-token-as-secret-name", "secrets", V, r"kubernetes\.secret_env\.0\.secret: looks like a credential",
         job=_k8s(secret_env=[{"name": "HF_TOKEN", "secret": HF_TOKEN, "key": "token"}]), secret=HF_TOKEN),
    Case("k8s-token-as-secret-key", "secrets", V, r"kubernetes\.secret_env\.0\.key: looks like a credential",
         job=_k8s(secret_env=[{"name": "HF_TOKEN", "secret": "hf", "key": HF_TOKEN}]), secret=HF_TOKEN),
    Case("k8s-bad-secret-name", "secrets", V, r"kubernetes\.secret_env\.0\.secret: not a Kubernetes object name",
         job=_k8s(secret_env=[{"name": "HF_TOKEN", "secret": "Not_A_Name", "key": "token"}])),
    Case("k8s-env-bad-name", "secrets", V, r"kubernetes\.env: a name is not an environment variable name",
         job=_k8s(env={HF_TOKEN + "-x": "1"}), secret=HF_TOKEN),
    Case("k8s-label-key", "secrets", V, r"kubernetes\.labels: 'bad label!' is not a Kubernetes label key",
         job=_k8s(labels={"bad label!": "x"})),
    Case("k8s-pull-secret-name", "secrets", V, r"kubernetes\.image_pull_secrets: an entry is not a Kubernetes Secret "
         r"name", job=_k8s(image_pull_secrets=["Bad_Name"])),
    Case("k8s-pull-secret-token", "secrets", V, r"kubernetes\.image_pull_secrets: an entry is not", secret=HF_TOKEN,
         job=_k8s(image_pull_secrets=[HF_TOKEN])),
    Case("k8s-quantity", "secrets", V, r"kubernetes\.memory_per_worker: '32 GB' is not a Kubernetes quantity",
         job=_k8s(memory_per_worker="32 GB")),
    Case("k8s-namespace", "secrets", V, r"kubernetes\.namespace: 'Bad_NS' is not a valid namespace",
         job=_k8s(namespace="Bad_NS")),
    Case("submit-env-space", "secrets", ["submit", "{job}", "--address", CLOSED, "--env", f"WANDB_API_KEY {HF_TOKEN}"],
         r"--env WANDB_API_KEY\.\.\.: expected NAME=VALUE", secret=HF_TOKEN, job=ON_S3),
    Case("submit-env-secret-name", "secrets", ["submit", "{job}", "--address", CLOSED, "--env", f"HF_TOKEN={HF_TOKEN}"],
         r"--env HF_TOKEN: looks like a secret", secret=HF_TOKEN, job=ON_S3),
    Case("submit-env-secret-value", "secrets", ["submit", "{job}", "--address", CLOSED, "--env", f"HUB={HF_TOKEN}"],
         r"--env HUB: has a value that looks like a credential", secret=HF_TOKEN, job=ON_S3),
    Case("submit-header-equals", "secrets", ["submit", "{job}", "--address", CLOSED, "--header",
                                             f"Authorization=Bearer {JWT}"],
         r"--header Authorization\.\.\.: expected 'Name: value'", secret=JWT[:40], job=ON_S3),
    Case("status-header-no-colon", "secrets", ["status", "x", "--address", CLOSED, "--header", f"Bearer {HF_TOKEN}"],
         r"--header Bearer\.\.\.: expected 'Name: value'", secret=HF_TOKEN),
    Case("submit-note-not-before-error", "secrets", ["submit", "{job}", "--address", CLOSED], r"cannot reach the Ray "
         r"dashboard", job=ON_S3),
    # -- storage and cluster addresses -----------------------------------------------------------------------------
    Case("ckpt-missing-folder", "storage", ["checkpoints", "nope/job"], r"nope/job: no such folder"),
    Case("ckpt-s3-no-bucket", "storage", ["checkpoints", "s3://"], r"job folder s3://: no bucket in the s3:// URI"),
    Case("ckpt-s3-bad-bucket", "storage", ["checkpoints", "s3://Bad_Bucket/x"], r"'Bad_Bucket' is not a valid S3"),
    Case("ckpt-gs", "storage", ["checkpoints", "gs://b/x"], r"job folder gs://b/x: unsupported URI scheme gs://"),
    Case("ckpt-s3-unreachable", "storage", ["checkpoints", "s3://bucket/job"],
         r"s3://bucket/job: cannot reach the S3 endpoint http://127\.0\.0\.1:1", env=S3ENV),
    Case("ckpt-storage-root", "storage", ["checkpoints", "runs"], r"runs: holds jobs \(tiny\), not checkpoints",
         files={"runs/tiny/step_00000004/.keep": ""}),
    Case("ckpt-s3-credentials", "storage", ["checkpoints", f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@b/x"],
         r"credentials do not belong", secret=AWS_SECRET),
    Case("export-missing", "storage", ["export", "nope/step_00000004", "--to", "out"], r"nope/step_00000004"),
    Case("export-alpha", "storage", ["export", "x", "--to", "out", "--interpolate", "2"], r"--interpolate 2: alpha must"),
    Case("export-alphas-word", "storage", ["export", "x", "--interpolate", "0,half", "--eval"],
         r"--interpolate 0,half: give alphas as numbers"),
    Case("export-alphas-repeat", "storage", ["export", "x", "--to", "o", "--interpolate", "0,1,1"], r"alpha is repeated"),
    Case("export-eval-no-alphas", "storage", ["export", "x", "--eval"], r"--eval: evaluates WiSE-FT interpolations"),
    Case("export-no-to", "storage", ["export", "x"], r"--to: where the model goes is required"),
    Case("export-eval-no-job-file", "storage", ["export", "runs/tiny/step_00000004", "--interpolate", "0,1", "--eval"],
         r"runs/tiny: no ftdist_job\.json", files={"runs/tiny/step_00000004/ftdist_manifest.json": "{}"}),
    Case("export-shard", "storage", ["export", "x", "--to", "out", "--max-shard-size", "big"],
         r"--max-shard-size: not a size"),
    Case("export-to-gs", "storage", ["export", "x", "--to", "gs://b/out"], r"--to gs://b/out: unsupported URI"),
    Case("sweep-report-missing", "storage", ["sweep-report", "nope"], r"nope"),
    Case("train-s3-unreachable", "storage", T, r"s3://bucket/runs/tiny: cannot reach the S3 endpoint",
         job=_set("checkpoint", storage="s3://bucket/runs"), env=S3ENV),
    Case("train-s3-no-credentials", "storage", T, r"s3://bucket/runs/tiny: no usable AWS credentials",
         job=_set("checkpoint", storage="s3://bucket/runs"),
         env={"AWS_ENDPOINT_URL": CLOSED, "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
              "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
              "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
              "AWS_WEB_IDENTITY_TOKEN_FILE": None}),
    Case("tracking-unreachable", "storage", T, r"tracking\.mlflow: http://127\.0\.0\.1:1: nothing accepts connections",
         job=_set("tracking", mlflow={"tracking_uri": CLOSED})),
    Case("tracking-env-unreachable", "storage", T, r"tracking\.mlflow: http://127\.0\.0\.1:1: nothing accepts",
         job=_set("tracking", mlflow={}), env={"MLFLOW_TRACKING_URI": CLOSED}),
    Case("tracking-no-uri", "storage", T, r"tracking\.mlflow: no tracking URI: set tracking\.mlflow\.tracking_uri or "
                                          r"MLFLOW_TRACKING_URI", job=_set("tracking", mlflow={}),
         env={"MLFLOW_TRACKING_URI": None}),
    Case("tracking-wandb-missing", "storage", T, r"tracking\.wandb: the wandb package is not installed",
         job=_set("tracking", wandb={"project": "p"})),
    Case("train-address-closed", "storage", [*T, "--address", "127.0.0.1:1"],
         r"--address 127\.0\.0\.1:1: cannot reach a Ray cluster"),
    Case("train-address-port-word", "storage", [*T, "--address", "head:port"], r"--address head:port: expected host:port"),
    Case("train-address-env", "storage", T, r"--address 127\.0\.0\.1:1: cannot reach", env={"RAY_ADDRESS": "127.0.0.1:1"}),
    Case("gpus-not-here", "storage", T, r"resources\.gpus_per_worker: 2 workers x 1 GPUs need 2 GPUs and this machine "
         r"has 0", job=lambda j: (j["resources"].update(gpus_per_worker=1), j["model"].update(dtype="bf16")),
         env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("gpus-not-here-tune", "storage", TU, r"resources\.gpus_per_worker: .* this machine has 0",
         job=lambda j: (_sweep()(j), j["resources"].update(gpus_per_worker=1), j["model"].update(dtype="bf16")),
         env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("submit-no-address", "storage", ["submit", "{job}"], r"--address: give the Ray dashboard address",
         env={"RAY_ADDRESS": None, "RAY_API_SERVER_ADDRESS": None}, job=ON_S3),
    Case("submit-no-scheme", "storage", ["submit", "{job}", "--address", "head:8265"], r"needs the dashboard's HTTP", job=ON_S3),
    Case("submit-ftp", "storage", ["submit", "{job}", "--address", "ftp://head:8265"], r"expected http\(s\)://", job=ON_S3),
    Case("submit-ca-missing", "storage", ["submit", "{job}", "--address", CLOSED, "--ca-cert", "nope.pem"],
         r"--ca-cert nope\.pem: no such file", job=ON_S3),
    Case("stop-bad-ipv6", "storage", ["stop", "x", "--address", "http://[::1"], r"--address http://\[::1: not a valid "
         r"URL"),
    Case("logs-port-word", "storage", ["logs", "x", "--address", "http://head:port"], r"not a valid URL"),
    Case("ckpt-verify-unknown", "storage", ["checkpoints", "runs/tiny", "--verify", "step_00000099"],
         r"--verify step_00000099: no such committed checkpoint in runs/tiny \(none committed\)",
         files={"runs/tiny/step_00000004/.keep": ""}),
    Case("jobs-unreachable", "storage", ["jobs", "--address", CLOSED], r"cannot reach the Ray dashboard"),
    Case("tune-no-sweep", "storage", TU, r"sweep"),
    Case("tune-empty-space", "storage", TU, r"sweep\.space: .*empty search space", job=_sweep(space={})),
    Case("tune-bad-key", "storage", V, r"sweep\.space\.optim\.lrr", job=_sweep(space={"optim.lrr": [1, 2]})),
    Case("validate-sweep-metric", "storage", V, r"sweep\.metric: 'accuracy' is not reported",
         job=_sweep(metric="accuracy")),
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """A case that gets past the checks made before Ray fails here instead of starting Ray."""
    import ftdist.sweep.tune
    import ftdist.train.driver

    def reached_ray(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the checks before Ray let this input through")

    monkeypatch.setattr(ftdist.train.driver, "run_training", reached_ray)
    monkeypatch.setattr(ftdist.sweep.tune, "run_sweep", reached_ray)


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _prepare(case: Case, tmp_path: Path, monkeypatch) -> list:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k, v in ENV_SECRETS.items():  # what a user's shell holds: no error may ever print it
        monkeypatch.setenv(k, v)
    for k, v in case.env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    for rel, content in case.files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    job = tiny_job_dict("store")
    if case.job is not None:
        case.job(job)
    text: Union[str, bytes] = yaml.safe_dump(job, sort_keys=False, allow_unicode=True)
    if case.text is not None:
        text = case.text(text)
    (tmp_path / "job.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return [a.replace("{job}", "job.yaml") for a in case.argv]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}:{c.id}" for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, monkeypatch, capsys):
    argv = _prepare(case, tmp_path, monkeypatch)
    before = _tree(tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("ftdist: error: "), err
    assert out == "", out  # nothing on stdout before (or beside) the error
    assert "Traceback" not in err
    assert re.search(case.expect, lines[0]), lines[0]
    assert _tree(tmp_path) == before  # nothing written: no run folder, no lease, no export, no cache
    if case.secret:
        assert case.secret not in out + err
    for name in ENV_SECRETS:
        assert os.environ.get(name, "<unset>") not in out + err, name


def test_the_table_covers_every_family_with_over_100_cases():
    families = {c.family for c in CASES}
    assert len(CASES) >= 100 and families == {"yaml", "schema", "keys", "cross", "paths", "rows", "overrides",
                                              "secrets", "storage"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_line_numbers_point_at_the_field(tmp_path, monkeypatch, capsys):
    """Cross-field and schema errors carry the line of the field they name (checked against the written file)."""
    text = yaml.safe_dump(tiny_job_dict("store"), sort_keys=False)
    (tmp_path / "job.yaml").write_text(text.replace("global_batch_size: 16", "global_batch_size: 15"))
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "job.yaml"]) == 2
    err = capsys.readouterr().err
    assert f"job.yaml:{_line_of(text, 'global_batch_size')}: optim.global_batch_size:" in err


# -- resource limits of the YAML reader --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [BILLION_LAUGHS, "lol: &x [*x]\n", "a: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "name: x\n# " + "y" * 5_000_000 + "\n"],
                         ids=["billion-laughs", "recursive", "deep", "5MB"])
def test_yaml_bombs_are_refused_in_bounded_time_and_memory(text, tmp_path):
    """Refused, not parsed: the expansion is counted on the node graph (each node once), so the check is linear in
    the file. Bounds: 20 MB of Python allocations and a few seconds, where the unbounded reader took minutes and
    gigabytes (the 5 MB file: a minute)."""
    from ftdist.errors import SpecError
    from ftdist.spec import load_spec

    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(SpecError):
        load_spec(p)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, peak
    assert elapsed < 15, elapsed  # a hang guard, generous for slow hosts: the bombs took minutes before


def test_storage_errors_answer_within_the_probe_policy(tmp_path, monkeypatch, capsys):
    """`ftdist checkpoints` asks an s3:// endpoint with the probe's two attempts, like train's preflight: a server
    that accepts and hangs up is tried twice, not ten times with backoff."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    accepted = []

    import threading

    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            accepted.append(1)
            conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        port = srv.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
        monkeypatch.chdir(tmp_path)
        assert main(["checkpoints", "s3://bucket/job"]) == 2
    finally:
        stop.set()
        th.join()
        srv.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3://bucket/job" in err
    # Two attempts; urllib3 reopens a connection the server dropped once more. The upload client (10 attempts with
    # backoff) made eleven and took 25-30 s.
    assert 1 <= len(accepted) <= 3, len(accepted)


# -- valid edge cases still pass ---------------------------------------------------------------------------------


VALID = [
    ("tilde-path", lambda j: j["data"].update(train="~/train.jsonl"), {"home/train.jsonl": _rows()}, None),
    ("unicode-prompts", lambda j: j["data"].update(train="u.jsonl"),
     {"u.jsonl": "".join(json.dumps({"prompt": f"Écris {i} — 数字 🙂", "completion": f" «{i}» ✓"},
                                    ensure_ascii=False) + "\n" for i in range(40))}, None),
    ("long-valid-row", lambda j: j["data"].update(train="long.jsonl"),
     {"long.jsonl": _rows(39) + json.dumps(_row(1, completion=" one" * 20_000)) + "\n"}, None),
    ("bom", None, {}, lambda t: "\ufeff" + t),
    ("anchors", None, {}, lambda t: t.replace("micro_batch_size: 8", "micro_batch_size: &mb 8").replace(
        "max_batches: 4", "max_batches: *mb")),
    ("exponent-string-lr", None, {}, lambda t: t.replace("lr: 0.003", "lr: 3e-3")),
    ("crlf", None, {}, lambda t: t.replace("\n", "\r\n")),
    ("spaces-in-path", lambda j: j["data"].update(train="my data/train set.jsonl"),
     {"my data/train set.jsonl": _rows()}, None),
    ("hub-id-model", lambda j: j["model"].update(from_config=None, tokenizer=None,
                                                 name_or_path="meta-llama/Llama-3.1-8B"), {}, None),
    ("skip-bad-rows", lambda j: j["data"].update(train="t.jsonl", on_bad_row="skip"),
     {"t.jsonl": _rows(bad=(2, "{oops"))}, None),
]


@pytest.mark.parametrize("name, change, files, text", VALID, ids=[v[0] for v in VALID])
def test_valid_edge_cases_pass(name, change, files, text, tmp_path, monkeypatch, capsys):
    case = Case(name, "valid", V, "", job=change, text=text, files=files)
    argv = _prepare(case, tmp_path, monkeypatch)
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert ": ok (" in out
    from ftdist.spec import load_spec
    from ftdist.train.driver import preflight_data

    spec = load_spec("job.yaml")
    if spec.model.from_config is not None:
        stats = preflight_data(spec).stats  # the rows tokenize on the driver, as `ftdist train` checks them
        assert stats is not None and stats.rows >= 39
        if name == "skip-bad-rows":
            assert stats.skipped_bad == 1 and "t.jsonl:2" in stats.summary()


def test_train_shows_the_skipped_row_count(tmp_path, monkeypatch, capsys):
    """`data.on_bad_row: skip` counts the skipped rows, and `ftdist train` says how many (and the first) before it
    starts Ray."""
    case = Case("skip", "valid", T, "", job=_data(train="t.jsonl", on_bad_row="skip"),
                files={"t.jsonl": _rows(bad=(2, "{oops"))})
    argv = _prepare(case, tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="let this input through"):
        main(argv)
    err = capsys.readouterr().err
    assert "ftdist: data: 39 rows" in err and "1 bad rows skipped (first: " in err and "t.jsonl:2" in err


def test_secret_redaction_guard():
    """The last guard on every error line: known token shapes and key=value credentials go, paths and hashes stay."""
    from ftdist.redact import key_hint, looks_like_secret, redact

    for secret in (HF_TOKEN, JWT, CONN, "AKIAIOSFODNN7EXAMPLE", "Bearer abcdefgh12345678", "ghp_" + "a1" * 15,
                   f"https://user:{AWS_SECRET}@host/x", "-----BEGIN RSA PRIVATE KEY-----", "Xk9fP2qLm8Rt4Vw7Yz1Bc3Nd5Gh6"
                   "Jk0Q"):
        assert looks_like_secret(secret), secret
        assert redact(f"x {secret} y") != f"x {secret} y"
    for plain in ("/tmp/pytest-of-root/pytest-12/test_Bad0VeryLongNameAbc123456789/job.yaml",
                  "blake3 3f1e2a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f", "s3://bucket/runs/tiny",
                  "kubernetes.secret_env.0.secret: required key is missing", "meta-llama/Llama-3.1-8B"):
        assert redact(plain) == plain and not looks_like_secret(plain), plain
    assert key_hint(f"kubernetes.env.HF_TOKEN:{HF_TOKEN}") == "kubernetes.env.HF_TOKEN..."
    assert key_hint(HF_TOKEN) == "(value not shown)"


@pytest.mark.parametrize("hub_error, expect", [
    ("RepositoryNotFoundError", r"model\.name_or_path: acme/no-such-model: no such folder here and no such \(public\) "
                                r"repo on the Hugging Face hub"),
    ("GatedRepoError", r"model\.name_or_path: acme/no-such-model: a gated repo"),
    ("RevisionNotFoundError", r"model\.revision: v9: no such branch, tag or commit"),
])
def test_a_hub_tokenizer_that_does_not_exist_is_refused_before_ray(hub_error, expect, tmp_path, monkeypatch, capsys):
    """With a hub id (the usual job), the driver loads the tokenizer from the hub to check the data rows; what the hub
    answers for a wrong id, a gated repo or a wrong revision is one line. (The hub's answer is raised the way
    transformers raises it: an OSError from huggingface_hub's error; no hub is reachable from the tests.)"""
    from types import SimpleNamespace

    import huggingface_hub.errors as hub_errors

    import ftdist.train.locations as locations

    def from_hub(path, trust_remote_code=False, revision=None):
        response = SimpleNamespace(headers={}, status_code=404, url=f"https://huggingface.co/{path}", request=None)
        raise OSError("as transformers words it") from getattr(hub_errors, hub_error)("hub says no", response=response)

    monkeypatch.setattr(locations, "load_tokenizer", from_hub)
    case = Case("hub", "paths", T, expect, job=_model(from_config=None, tokenizer=None, revision="v9",
                                                       name_or_path="acme/no-such-model"))
    argv = _prepare(case, tmp_path, monkeypatch)
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(expect, err), err
    assert _tree(tmp_path) == before


def test_no_connection_to_the_hub_leaves_the_rows_to_the_workers(tmp_path, monkeypatch, capsys):
    """Offline (as here: HF_HUB_OFFLINE=1 and nothing cached), the driver cannot check the rows with a hub tokenizer:
    it says so in a note and goes on to Ray (the stub)."""
    case = Case("offline", "paths", T, "", job=_model(from_config=None, tokenizer=None, name_or_path="acme/model"))
    argv = _prepare(case, tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="let this input through"):
        main(argv)
    assert "ftdist: note: model.name_or_path: acme/model: not reachable on the Hugging Face hub" in \
        capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gpt2", "bert"])
def test_validate_reads_the_same_config_keys_as_the_real_class(model_type):
    """`ftdist validate` reads a config class's settings from transformers' source (no torch import); they must be
    exactly what the imported class defines, which the driver's preflight checks against."""
    from transformers import CONFIG_MAPPING

    from ftdist.spec.config_keys import config_keys
    from ftdist.train.model_config import config_keys as imported_keys

    assert config_keys(model_type) == imported_keys(CONFIG_MAPPING[model_type])


def test_the_preflight_checks_from_config_where_the_source_cannot_say(monkeypatch):
    """Where the source reader answers None (another transformers layout), the driver's preflight still refuses a
    key the imported config class does not define."""
    import ftdist.spec.config_keys as source
    from ftdist.errors import SpecError
    from ftdist.spec import ModelSpec
    from ftdist.train.model_config import check_from_config

    monkeypatch.setattr(source, "config_keys", lambda _t: None)
    monkeypatch.setattr("ftdist.spec.job.config_keys", lambda _t: None)
    spec = ModelSpec(from_config={"model_type": "llama", "hiden_size": 64}, tokenizer="t")
    with pytest.raises(SpecError, match=r"model\.from_config\.hiden_size: not a setting of transformers' "
                                        r"LlamaConfig \(did you mean hidden_size\?\)"):
        check_from_config(spec)


def test_a_live_attempt_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    """The run lease is read before Ray starts: a second `ftdist train` of a running job is one line and writes
    nothing (the integration test takes the lease path with a real Ray)."""
    from ftdist.storage.store import open_store
    from tests.support.leases import foreign_lease

    argv = _prepare(Case("lease", "storage", T, ""), tmp_path, monkeypatch)
    foreign_lease(open_store(str(tmp_path / "store" / "tiny")), 1, age_s=5)
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "store/tiny: another attempt of this job is running (host gpu-node-7" in err
    assert _tree(tmp_path) == before
