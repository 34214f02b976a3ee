"""Bad input through the real CLI: every kind ends in exit code 2 and one message that names the file or key and
says the fix; nothing is written, and nothing that was there (a foreign directory, a finished dataset) is
touched. Each case builds its files under tmp_path; the whole tree is compared byte for byte before and after."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import stdlib_texts, write_jsonl
from cbs.pipeline import cli
from test_data import make_small_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A finished small dataset; cases copy it before they damage it."""
    return make_small_data(tmp_path_factory.mktemp("bad-input") / "data")


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    """Another dataset (other documents, other tokenizer): the source of foreign shards and tokenizers."""
    from cbs.pipeline.config import TokenizerConfig

    return make_small_data(tmp_path_factory.mktemp("bad-input-other") / "data", documents=50,
                           tokenizer=TokenizerConfig(vocab_size=380))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root (hidden temp directories too) -> 'dir' or the sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ preprocess


def pre_yaml(tmp: Path, inputs, extra: str = "") -> Path:
    listed = ", ".join(f"'{i}'" for i in inputs)
    path = tmp / "pre.yaml"
    path.write_text(f"inputs: [{listed}]\noutput_dir: {tmp / 'out'}\ntokenizer: {{vocab_size: 400}}\n"
                    f"val_fraction: 0.2\n{extra}")
    return path


def corpus(tmp: Path, n: int = 40) -> Path:
    return write_jsonl(tmp / "docs.jsonl", stdlib_texts(n))


Case = Callable[[Path, Path, Path], tuple[list[str], str, str]]
"""(tmp, data, other_data) -> (argv, regex naming the file or key, regex of the fix)."""


def yaml_syntax(tmp, data, other):
    (tmp / "pre.yaml").write_text("inputs: [stdlib\noutput_dir: out\n")
    return ["preprocess", str(tmp / "pre.yaml")], r"pre\.yaml:\d+:\d+", "fix the YAML"


def yaml_list(tmp, data, other):
    (tmp / "pre.yaml").write_text("- inputs: [stdlib]\n- output_dir: out\n")
    return ["preprocess", str(tmp / "pre.yaml")], r"pre\.yaml must hold a mapping", "write one `key: value`"


def yaml_duplicate_key(tmp, data, other):
    (tmp / "pre.yaml").write_text(f"inputs: [stdlib]\noutput_dir: {tmp / 'out'}\nval_fraction: 0.1\n"
                                  f"val_fraction: 0.2\n")
    return ["preprocess", str(tmp / "pre.yaml")], r"pre\.yaml:4: val_fraction is given twice", "keep one"


def yaml_nul_byte(tmp, data, other):
    (tmp / "pre.yaml").write_bytes(b"inputs: [stdlib]\x00\noutput_dir: out\n")
    return ["preprocess", str(tmp / "pre.yaml")], r"pre\.yaml:1:17: not valid YAML \(control character", "remove it"


def yaml_not_utf8(tmp, data, other):
    (tmp / "pre.yaml").write_bytes(b"inputs: [stdlib]\noutput_dir: caf\xe9\n")
    return ["preprocess", str(tmp / "pre.yaml")], r"pre\.yaml is not UTF-8 text", "save it as UTF-8"


def unknown_key(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"], "val_fractoin: 0.1\n"))],
            r"preprocess\.val_fractoin is not a known key", r"did you mean preprocess\.val_fraction\?")


def missing_config(tmp, data, other):
    return ["preprocess", str(tmp / "nope.yaml")], r"nope\.yaml", "check the path"


def directory_as_config(tmp, data, other):
    (tmp / "configs").mkdir()
    return ["preprocess", str(tmp / "configs")], r"configs is a directory", "give the path of a YAML file"


def set_without_equals(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"])), "--set", "workers"], r"override 'workers'",
            "must look like key.subkey=value")


def set_empty_key_part(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"])), "--set", "tokenizer..vocab_size=3"],
            r"override 'tokenizer\.\.vocab_size=3'", "empty key part")


def set_into_a_list(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"])), "--set", "inputs.first=x"],
            r"override 'inputs\.first=x': inputs is not a mapping", r"--set inputs=")


def set_wrong_type(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"])), "--set", "workers=two"],
            r"preprocess\.workers", "must be an integer: got 'two'")


def max_documents_one(tmp, data, other):
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"])), "--set", "max_documents=1"],
            r"preprocess\.max_documents", r"must be >= 2")


def output_dir_is_a_file(tmp, data, other):
    (tmp / "out").write_text("my notes")
    return ["preprocess", str(pre_yaml(tmp, [corpus(tmp)]))], r"output_dir .*out exists and is a file", \
        "choose another output_dir"


def output_dir_parent_is_a_file(tmp, data, other):
    (tmp / "notes").write_text("my notes")
    path = pre_yaml(tmp, [corpus(tmp)])
    return (["preprocess", str(path), "--set", f"output_dir={tmp / 'notes' / 'out'}"],
            r"output_dir .*notes/out: .*notes is a file", "choose another output_dir")


def output_dir_foreign(tmp, data, other):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("keep me")
    return (["preprocess", str(pre_yaml(tmp, [corpus(tmp)])), "--force"], r"output_dir .*out .*not a cbs data",
            "choose a new or empty directory")


def finished_dataset_other_settings(tmp, data, other):
    shutil.copytree(data, tmp / "out")
    return (["preprocess", str(pre_yaml(tmp, ["stdlib"]))], r"out holds data made from other settings",
            "use --force to replace it, or choose another output_dir")


def glob_matches_nothing(tmp, data, other):
    return ["preprocess", str(pre_yaml(tmp, [tmp / "shards" / "*.jsonl"]))], r"shards/\*\.jsonl' matched no file", \
        "check the path or glob"


def stdlib_typo(tmp, data, other):
    return ["preprocess", str(pre_yaml(tmp, ["stdib"]))], r"input 'stdib'", r"did you mean 'stdlib'\?"


def directory_without_documents(tmp, data, other):
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "a.csv").write_text("text\nhello\n")
    return ["preprocess", str(pre_yaml(tmp, [tmp / "corpus"]))], r"corpus' holds no \.txt", \
        r"give \.txt, \.jsonl"


def hf_without_name(tmp, data, other):
    return ["preprocess", str(pre_yaml(tmp, ["hf:"]))], r"input 'hf:'", r"give a dataset name"


def jsonl_not_an_object(tmp, data, other):
    path = corpus(tmp)
    path.write_text(path.read_text() + '["a list", "not an object"]\n')
    return ["preprocess", str(pre_yaml(tmp, [path]))], r"docs\.jsonl:41: record is a list", "set on_error: skip"


def jsonl_bad_json(tmp, data, other):
    path = corpus(tmp)
    path.write_text('{"text": "unterminated\n' + path.read_text())
    return ["preprocess", str(pre_yaml(tmp, [path]))], r"docs\.jsonl:1: invalid JSON", "set on_error: skip"


def jsonl_text_not_a_string(tmp, data, other):
    path = corpus(tmp)
    path.write_text(path.read_text() + '{"text": 42}\n')
    return ["preprocess", str(pre_yaml(tmp, [path]))], r"docs\.jsonl:41: field 'text' is int", "set on_error: skip"


def gzip_corrupt(tmp, data, other):
    (tmp / "docs.jsonl.gz").write_bytes(gzip.compress(corpus(tmp).read_bytes())[:300])
    return ["preprocess", str(pre_yaml(tmp, [tmp / "docs.jsonl.gz"]))], r"docs\.jsonl\.gz: cannot read", \
        "replace the file or remove it from inputs"


def parquet_without_text(tmp, data, other):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": stdlib_texts(20)}), tmp / "docs.parquet")
    return ["preprocess", str(pre_yaml(tmp, [tmp / "docs.parquet"]))], r"docs\.parquet: no column 'text'", \
        "set text_field"


def parquet_not_parquet(tmp, data, other):
    (tmp / "docs.parquet").write_text("text\nhello\n")
    return ["preprocess", str(pre_yaml(tmp, [tmp / "docs.parquet"]))], r"docs\.parquet: cannot read as parquet", \
        "replace the file or remove it from inputs"


def binary_as_txt(tmp, data, other):
    (tmp / "txt").mkdir()
    for i, text in enumerate(stdlib_texts(30)):
        (tmp / "txt" / f"{i:02d}.txt").write_text(text)
    shutil.copy(sys.executable, tmp / "txt" / "python.txt")
    return ["preprocess", str(pre_yaml(tmp, [tmp / "txt" / "*.txt"]))], r"python\.txt: binary file", \
        "remove it from inputs"


def empty_corpus(tmp, data, other):
    (tmp / "empty.jsonl").write_text('{"text": ""}\n\n')
    return ["preprocess", str(pre_yaml(tmp, [tmp / "empty.jsonl"]))], r"empty corpus: no document with text in " \
        r".*empty\.jsonl", "give inputs with text"


def corpus_too_small_for_val(tmp, data, other):
    path = write_jsonl(tmp / "docs.jsonl", stdlib_texts(3))
    cfg = pre_yaml(tmp, [path], f"tokenizer: {{model: {data / 'tokenizer.model'}}}\n")
    cfg.write_text(cfg.read_text().replace("tokenizer: {vocab_size: 400}\n", ""))
    return (["preprocess", str(cfg), "--set", "val_fraction=0.01"], r"no document fell in the val split",
            r"raise preprocess\.val_fraction or add documents")


def corpus_too_small_for_vocab(tmp, data, other):
    path = write_jsonl(tmp / "docs.jsonl", ["tiny corpus one", "tiny corpus two", "and three"])
    return ["preprocess", str(pre_yaml(tmp, [path]))], r"preprocess\.tokenizer\.vocab_size=400", \
        "lower tokenizer.vocab_size or add data"


def tokenizer_not_sentencepiece(tmp, data, other):
    (tmp / "tok.model").write_text("this is not a model")
    cfg = pre_yaml(tmp, [corpus(tmp)], f"tokenizer: {{model: {tmp / 'tok.model'}}}\n")
    cfg.write_text(cfg.read_text().replace("tokenizer: {vocab_size: 400}\n", ""))
    return ["preprocess", str(cfg)], r"preprocess\.tokenizer\.model .*tok\.model is not a SentencePiece model", \
        "give a .model file"


def tokenizer_without_eos(tmp, data, other):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((data / "tokenizer.model").read_bytes())
    proto.trainer_spec.eos_id = -1
    proto.pieces[2].type = pb.ModelProto.SentencePiece.USER_DEFINED  # </s> becomes an ordinary piece
    (tmp / "noeos.model").write_bytes(proto.SerializeToString())
    cfg = pre_yaml(tmp, [corpus(tmp)], f"tokenizer: {{model: {tmp / 'noeos.model'}}}\n")
    cfg.write_text(cfg.read_text().replace("tokenizer: {vocab_size: 400}\n", ""))
    return ["preprocess", str(cfg)], r"noeos\.model has no end-of-sequence piece", "train it with an eos piece"


def tokenizer_missing(tmp, data, other):
    cfg = pre_yaml(tmp, [corpus(tmp)], f"tokenizer: {{model: {tmp / 'gone.model'}}}\n")
    cfg.write_text(cfg.read_text().replace("tokenizer: {vocab_size: 400}\n", ""))
    return ["preprocess", str(cfg)], r"preprocess\.tokenizer\.model .*gone\.model does not exist", "check the path"


# ------------------------------------------------------------------------------------------------ pretrain


def pt_yaml(tmp: Path, data_dir: Path, extra: str = "") -> Path:
    path = tmp / "pt.yaml"
    path.write_text(f"data_dir: {data_dir}\nrun_dir: {tmp / 'run'}\nmodel: {{preset: tiny, seq_len: 64}}\n"
                    f"global_batch_seqs: 8\nmicro_batch_seqs: 4\ntrain_tokens: 4096\n{extra}")
    return path


def damaged(tmp: Path, data: Path, damage: Callable[[Path], None]) -> Path:
    copy = Path(shutil.copytree(data, tmp / "data"))
    damage(copy)
    return copy


REBUILD = r"cbs preprocess --force"


def truncated_idx(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "train.idx").write_bytes((d / "train.idx").read_bytes()[:100]))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/train\.idx is 100 bytes .* truncated", REBUILD


def truncated_idx_header(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "val.idx").write_bytes(b"MMIDIDX"))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/val\.idx is not a megatron-core index", REBUILD


def truncated_bin(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:5001]))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/train\.bin is 5001 bytes .* truncated", REBUILD


def idx_of_another_dataset(tmp, data, other):
    d = damaged(tmp, data, lambda d: shutil.copy(other / "train.idx", d / "train.idx"))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/train\.bin .* the \.idx belongs to another dataset", REBUILD


def shards_of_another_dataset(tmp, data, other):
    def swap(d):
        for name in ("val.idx", "val.bin"):
            shutil.copy(other / name, d / name)
    d = damaged(tmp, data, swap)
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/val\.idx holds \d+ documents .* from another dataset", REBUILD


def bin_idx_dtype_mismatch(tmp, data, other):
    def widen(d):
        tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
        tokens.astype(np.int32).tofile(d / "train.bin")  # as if written with int32 under a uint16 index
    d = damaged(tmp, data, widen)
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/train\.bin .* it holds int32 tokens, the index says uint16", \
        REBUILD


def vocab_larger_than_shard_dtype(tmp, data, other):
    def edit(d):
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["vocab_size"] = 70_000
        (d / "manifest.json").write_text(json.dumps(manifest))
    d = damaged(tmp, data, edit)
    return (["pretrain", str(pt_yaml(tmp, d))],
            r"manifest\.json says vocab_size 70000, but .*train\.idx holds uint16 tokens", REBUILD)


def missing_manifest(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "manifest.json").unlink())
    return ["pretrain", str(pt_yaml(tmp, d))], r"data_dir .*data is not a preprocessed data directory", \
        "run `cbs preprocess` first"


def manifest_broken_json(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:50]))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/manifest\.json is not valid JSON", REBUILD


def manifest_not_ours(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "manifest.json").write_text('["not", "a", "manifest"]'))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/manifest\.json lacks vocab_size", REBUILD


def data_dir_missing(tmp, data, other):
    return ["pretrain", str(pt_yaml(tmp, tmp / "nowhere"))], r"data_dir .*nowhere does not exist", \
        "run `cbs preprocess` first"


def data_dir_without_shards(tmp, data, other):
    d = damaged(tmp, data, lambda d: [(d / n).unlink() for n in ("train.bin", "train.idx")])
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/train\.idx is missing", REBUILD


def tokenizer_garbage_in_data_dir(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "tokenizer.model").write_text("not a model"))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/tokenizer\.model is not the tokenizer the shards were made " \
        r"with", "put the original back"


def tokenizer_of_another_dataset(tmp, data, other):
    d = damaged(tmp, data, lambda d: shutil.copy(other / "tokenizer.model", d / "tokenizer.model"))
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/tokenizer\.model is not the tokenizer the shards were made " \
        r"with", "put the original back"


def tokenizer_missing_in_data_dir(tmp, data, other):
    d = damaged(tmp, data, lambda d: (d / "tokenizer.model").unlink())
    return ["pretrain", str(pt_yaml(tmp, d))], r"data/tokenizer\.model is missing", REBUILD


def set_train_tokens_abc(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "train_tokens=abc"],
            r"pretrain\.train_tokens", "must be an integer: got 'abc'")


def set_layers_fraction(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "model.layers=2.5"],
            r"pretrain\.model\.layers", "must be an integer: got 2.5")


def mup_base_not_splitting_into_heads(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "model.mup=30"],
            r"pretrain\.model\.mup\.base_hidden \(30\) must be divisible by pretrain\.model\.heads",
            "give a multiple of")


def mup_base_zero(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "model.mup.base_hidden=0"],
            r"pretrain\.model\.mup\.base_hidden", "must be a width >= 1: got 0")


def scale_not_whole(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "model.scale.width=1.3"],
            r"pretrain\.model\.scale\.width", "give a factor that makes it one")


def set_section_to_scalar(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "eval=3"], r"pretrain\.eval",
            "must be a mapping of EvalConfig fields")


def unknown_nested_key(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "optimizer.betas=0.9"],
            r"pretrain\.optimizer\.betas is not a known key", r"did you mean pretrain\.optimizer\.beta")


def study_yaml(tmp: Path, data_dir: Path, settings: str, extra: str = "") -> Path:
    path = tmp / "study.yaml"
    path.write_text(f"data: {data_dir}\nbatch_sizes: [4, 8]\nsettings: {settings}\n{extra}")
    return path


def study_train_tokens_text(tmp, data, other):
    return (["study", str(study_yaml(tmp, data, "[{model: tiny, train_tokens: abc}]")), "--out", str(tmp / "s")],
            r"study\.settings\[0\]\.train_tokens must be a token count: got 'abc'", r"e\.g\. 300000, 3e5 or 300K")


def study_tokens_bad_suffix(tmp, data, other):
    settings = "{generator: fixed_model, model: tiny, tokens: [300K, 1X]}"
    return (["study", str(study_yaml(tmp, data, settings)), "--out", str(tmp / "s")],
            r"study\.settings\.tokens\[1\] must be a token count: got '1X'", r"300K")


def study_base_key_typo(tmp, data, other):
    path = study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K}]", "base: {optimizer: {weight_decy: 0.1}}\n")
    return (["study", str(path), "--out", str(tmp / "s")],
            r"^cbs study: error: study\.base\.optimizer\.weight_decy is not a known key",
            r"did you mean study\.base\.optimizer\.weight_decay\?")


def study_base_bad_value(tmp, data, other):
    path = study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K}]", "base: {eval: {eval_tokens: lots}}\n")
    return (["study", str(path), "--out", str(tmp / "s")], r"^cbs study: error: study\.base\.eval\.eval_tokens",
            "must be an integer: got 'lots'")


def ramp_batch_larger_than_data(tmp, data, other):
    """The data check read global_batch_seqs, which a ramp leaves unset: its largest stage went unchecked."""
    path = tmp / "pt.yaml"
    path.write_text(f"data_dir: {data}\nrun_dir: {tmp / 'run'}\nmodel: {{preset: tiny, seq_len: 64}}\n"
                    f"micro_batch_seqs: 4\ntrain_tokens: 1000000000\n"
                    f"batch_schedule: {{stages: [{{batch: 8, until_tokens: 4096}}, {{batch: 1000000}}]}}\n")
    return (["pretrain", str(path)],
            r"pretrain\.batch_schedule's largest batch 1000000 is more than the [\d,]+ sequences",
            "or add documents to the corpus")


def ramp_first_batch_larger_than_budget(tmp, data, other):
    """Only the stage boundaries were checked against the budget: a fixed batch this large was refused, a ramp's
    first stage was not."""
    path = tmp / "pt.yaml"
    path.write_text(f"data_dir: {data}\nrun_dir: {tmp / 'run'}\nmodel: {{preset: tiny, seq_len: 64}}\n"
                    f"micro_batch_seqs: 4\ntrain_tokens: 100\nbatch_schedule: [{{batch: 8}}]\n")
    return (["pretrain", str(path)], r"pretrain\.batch_schedule's first batch 8 x model\.seq_len 64 = 512 tokens",
            "lower the first batch or raise train_tokens")


def lr_infinite(tmp, data, other):
    """`lr: .inf` passed `lr > 0`: the run trained NaN weights and wrote a bare NaN into result.json."""
    return (["pretrain", str(pt_yaml(tmp, data, "optimizer: {lr: .inf}\n"))], r"pretrain\.optimizer\.lr",
            "must be a finite number: got inf")


def batch_larger_than_budget(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "global_batch_seqs=1000000000"],
            r"pretrain\.global_batch_seqs 1000000000 x model\.seq_len 64 .* more than pretrain\.train_tokens \(4,096\)",
            "lower global_batch_seqs to at most 64 or raise train_tokens")


def batch_larger_than_data(tmp, data, other):
    return (["pretrain", str(pt_yaml(tmp, data)), "--set", "global_batch_seqs=1000000", "--set",
             "train_tokens=1000000000"],
            r"pretrain\.global_batch_seqs 1000000 is more than the [\d,]+ sequences .* train split of .*data",
            "lower global_batch_seqs, or add documents")


# ------------------------------------------------------------------------------------------------ study


def study_config_file(tmp: Path, data: Path, settings: str) -> Path:
    path = tmp / "study.yaml"
    path.write_text(f"name: s\ndata: {data}\nbatch_sizes: [4, 8, 16]\nsettings: {settings}\n")
    return path


def study_model_a_number(tmp, data, other):
    return (["study", str(study_config_file(tmp, data, "[{model: 5, train_tokens: 100000}]")), "--out", str(tmp / "s")],
            r"study\.settings\[0\]\.model must be a preset name \(.*tiny.*\) or a mapping of model fields: got 5",
            "preset name")


def study_setting_name_a_list(tmp, data, other):
    """A setting's name that is no text ended in a traceback (a TypeError) while the runs were named."""
    return (["study", str(study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K, name: [1]}]")), "--out",
             str(tmp / "s")], r"study\.settings\[0\]\.name must be a string", r"got \[1\]")


def study_setting_target_text(tmp, data, other):
    """A setting's target that is no number was named as a key of a run (`study run NAME.targets[0]`), not where
    it was written."""
    return (["study", str(study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K, target: abc}]")), "--out",
             str(tmp / "s")], r"study\.settings\[0\]\.target must be a number", "got 'abc'")


def study_slurm_nodes_text(tmp, data, other):
    """study.slurm was a plain mapping: a bad value went unchecked until a Slurm job was built (and not at all
    with the local executor, which then trained the whole study)."""
    path = study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K}]", "slurm: {nodes: two}\n")
    return (["study", str(path), "--out", str(tmp / "s")], r"study\.slurm\.nodes must be an integer", "got 'two'")


def study_slurm_unknown_key(tmp, data, other):
    path = study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K}]", "slurm: {gpus_per_nod: 4}\n")
    return (["study", str(path), "--out", str(tmp / "s")], r"study\.slurm\.gpus_per_nod is not a known key",
            r"did you mean study\.slurm\.gpus_per_node\?")


def study_batch_does_not_split_on_the_ranks(tmp, data, other):
    """A batch that does not split over the ranks each run gets (Slurm: nodes x gpus_per_node) was planned, and
    every such run would have failed at its start."""
    path = study_yaml(tmp, data, "[{model: tiny, train_tokens: 300K}]", "base: {micro_batch_seqs: 4}\n")
    return (["study", str(path), "--out", str(tmp / "s"), "--executor", "slurm", "--nodes", "1", "--gpus-per-node",
             "2", "--dry-run"],
            r"study\.batch_sizes \[4\] cannot be split over 2 data-parallel ranks \(slurm nodes 1 x gpus_per_node 2\)",
            r"set base\.micro_batch_seqs: 2")


def study_data_missing(tmp, data, other):
    """Refused, but study.yaml used to be written first: the corrected command was then refused as "another study"."""
    return (["study", str(study_config_file(tmp, tmp / "nowhere", "[{model: tiny, train_tokens: 100000}]")), "--out",
             str(tmp / "s")], r"study\.data .*nowhere is not a preprocessed data directory",
            "run `cbs preprocess` first")


def study_slurm_out_with_percent(tmp, data, other):
    """sbatch expands %j in the log paths: the jobs wrote elsewhere than the study directory."""
    return (["study", str(study_config_file(tmp, data, "[{model: tiny, train_tokens: 100000}]")), "--out",
             str(tmp / "s%j"), "--executor", "slurm"], r"--out '.*s%j' contains '%'", "choose another --out")


def study_slurm_out_with_newline(tmp, data, other):
    """A newline in the path split the runs file that the array tasks read line by line."""
    return (["study", str(study_config_file(tmp, data, "[{model: tiny, train_tokens: 100000}]")), "--out",
             str(tmp / "s\nt"), "--executor", "slurm"], r"--out '.*s\\nt' contains '\\n'", "choose another --out")


def schedule_free_with_cosine(tmp, data, other):
    extra = "optimizer: {kind: schedule_free}\nschedule: {kind: cosine}\n"
    return (["pretrain", str(pt_yaml(tmp, data, extra))], r"pretrain\.schedule\.kind is cosine .*schedule_free",
            r"set pretrain\.schedule\.kind: constant")


def schedule_free_with_ewa(tmp, data, other):
    extra = "optimizer: {kind: schedule_free}\newa: {taus: [0.99]}\n"
    return (["pretrain", str(pt_yaml(tmp, data, extra))], r"pretrain\.ewa\.taus is set", r"set ewa\.taus: \[\]")


def ramp_half_life_bad_clip(tmp, data, other):
    extra = ("batch_schedule: {stages: [{batch: 8}], beta2: half_life, half_life: {beta2_clip: [0.9, 1.0]}}\n")
    path = pt_yaml(tmp, data, extra)
    path.write_text(path.read_text().replace("global_batch_seqs: 8\n", ""))
    return (["pretrain", str(path)], r"pretrain\.batch_schedule\.half_life\.beta2_clip", r"0 <= lo <= hi < 1")


CASES: dict[str, Case] = {f.__name__: f for f in [
    yaml_syntax, yaml_nul_byte, yaml_list, yaml_duplicate_key, yaml_not_utf8, unknown_key, missing_config,
    directory_as_config,
    set_without_equals, set_empty_key_part, set_into_a_list, set_wrong_type, max_documents_one,
    output_dir_is_a_file, output_dir_parent_is_a_file, output_dir_foreign, finished_dataset_other_settings,
    glob_matches_nothing, stdlib_typo, directory_without_documents, hf_without_name, jsonl_not_an_object,
    jsonl_bad_json, jsonl_text_not_a_string, gzip_corrupt, parquet_without_text, parquet_not_parquet,
    binary_as_txt, empty_corpus, corpus_too_small_for_val, corpus_too_small_for_vocab,
    tokenizer_not_sentencepiece, tokenizer_without_eos, tokenizer_missing,
    truncated_idx, truncated_idx_header, truncated_bin, idx_of_another_dataset, shards_of_another_dataset,
    bin_idx_dtype_mismatch, vocab_larger_than_shard_dtype, missing_manifest, manifest_broken_json,
    manifest_not_ours, data_dir_missing, data_dir_without_shards, tokenizer_garbage_in_data_dir,
    tokenizer_of_another_dataset, tokenizer_missing_in_data_dir, set_train_tokens_abc, set_layers_fraction,
    set_section_to_scalar, unknown_nested_key, mup_base_not_splitting_into_heads, mup_base_zero, scale_not_whole,
    study_train_tokens_text, study_tokens_bad_suffix, study_base_key_typo,
    study_base_bad_value, batch_larger_than_budget, batch_larger_than_data, ramp_batch_larger_than_data,
    ramp_first_batch_larger_than_budget, lr_infinite,
    study_model_a_number, study_data_missing, study_setting_name_a_list, study_setting_target_text,
    study_slurm_nodes_text, study_slurm_unknown_key, study_batch_does_not_split_on_the_ranks,
    study_slurm_out_with_percent, study_slurm_out_with_newline,
    schedule_free_with_cosine, schedule_free_with_ewa, ramp_half_life_bad_clip,
]}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_names_the_culprit_and_the_fix_and_writes_nothing(case, tmp_path, data, other_data,
                                                                             capsys):
    argv, names, fix = CASES[case](tmp_path, data, other_data)
    before = snapshot(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if ": error: " in line]
    assert len(message) == 1, err  # one message, no traceback
    assert re.search(names, message[0]), message[0]
    assert re.search(fix, message[0]), message[0]
    assert snapshot(tmp_path) == before


def test_no_traceback_reaches_the_user(tmp_path, data, other_data):
    """The issue's own example, as a user runs it: a truncated train.idx given to `cbs pretrain`."""
    argv, names, fix = truncated_idx(tmp_path, data, other_data)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cbs.pipeline.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr
    assert re.search(names, proc.stderr) and re.search(fix, proc.stderr)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ input that is accepted


def test_token_counts_are_read_with_the_suffixes_cbs_prints(tmp_path, data, capsys):
    """`tokens: [300K, 1M]` (as cbs names settings and runs) ended in a traceback; `--set train_tokens=4K` too."""
    from cbs.pipeline.config import PretrainConfig, load_config, parse_tokens

    settings = "{generator: fixed_model, model: tiny, tokens: [300K, 1M]}"
    assert cli.main(["study", str(study_yaml(tmp_path, data, settings)), "--out", str(tmp_path / "s"),
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mtiny_d1M_b4_lr0.00316: batch 4" in out and "serves mtiny_d300K, mtiny_d1M" in out
    assert load_config(PretrainConfig, pt_yaml(tmp_path, data), ["train_tokens=4K"]).train_tokens == 4000
    assert [parse_tokens(v, "k") for v in ("0.3K", "1.7B", "2T", "1_000", "1e9", 5e5, 12)] == \
        [300, 1_700_000_000, 2 * 10**12, 1000, 10**9, 500_000, 12]


def test_the_examples_of_cbs_study_help_are_accepted(tmp_path, data, capsys):
    """`cbs study --help` showed `--set tokenizer.vocab_size=4096`, which a study refuses."""
    with pytest.raises(SystemExit):
        cli.main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    example = re.search(r"\(repeatable\): --set (\S+=\S+)", text).group(1)
    assert "tokenizer" not in example and "--executor {local,slurm} local (default)" in text
    path = study_yaml(tmp_path, data, "[{model: tiny, train_tokens: 300K}]")
    assert cli.main(["study", str(path), "--out", str(tmp_path / "s"), "--dry-run", "--set", example]) == 0


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, data):
    """`cbs study ... --dry-run | head` ended in a BrokenPipeError traceback (every stage goes through cli.main)."""
    study = study_yaml(tmp_path, data, "{generator: fixed_model, model: tiny, tokens: [300K, 1M, 3M, 10M]}")
    argv = ["study", str(study), "--out", str(tmp_path / "s"), "--dry-run"]
    proc = subprocess.Popen([sys.executable, "-m", "cbs.pipeline.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first line is written (python takes a second to start)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err


def test_invalid_utf8_lines_are_counted_not_fatal(tmp_path, capsys):
    texts = stdlib_texts(40)
    lines = [json.dumps({"text": t}).encode() for t in texts]
    for i in range(0, 40, 8):  # raw invalid bytes inside the JSON string of 5 records
        lines[i] = lines[i][:-2] + b"\xff\xfe" + lines[i][-2:]
    (tmp_path / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert cli.main(["preprocess", str(pre_yaml(tmp_path, [tmp_path / "docs.jsonl"]))]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["invalid_utf8_documents"] == 5 and sum(manifest["documents"].values()) == 40


def test_binary_file_is_skipped_and_counted_with_on_error_skip(tmp_path):
    binary_as_txt(tmp_path, None, None)
    cfg = pre_yaml(tmp_path, [tmp_path / "txt" / "*.txt"], "on_error: skip\n")
    assert cli.main(["preprocess", str(cfg)]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped_records"] == 1 and "python.txt: binary file" in manifest["skipped_examples"][0]
    assert sum(manifest["documents"].values()) == 30


# ------------------------------------------------------------------------------------------------ past the config


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_pretrain_split_shorter_than_one_sequence_writes_nothing(tmp_path, data, split):
    tokens = json.loads((data / "manifest.json").read_text())["tokens"][split]
    cfg = pt_yaml(tmp_path, data)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cbs.pipeline.cli", "pretrain", str(cfg), "--set",
                           f"model.seq_len={tokens}", "--set", f"train_tokens={8 * tokens}"],  # a budget of 1 step
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(rf"{split} split of .*data has {tokens} tokens: fewer than one sequence", proc.stderr)
    assert snapshot(tmp_path) == before  # no run_dir, no result.json of a run that never started


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data) -> Path:
    """A 2-step tiny run with its final checkpoint, trained in this process (as tests/test_evaluate.py does)."""
    from cbs.pipeline import pretrain
    from cbs.pipeline.config import PretrainConfig, load_config

    tmp = tmp_path_factory.mktemp("bad-input-run")
    cfg = load_config(PretrainConfig, pt_yaml(tmp, data), ["train_tokens=1024", "eval.eval_tokens=256"])
    assert pretrain.main(cfg)["status"] == "completed"
    return tmp / "run"


@pytest.mark.slow
def test_evaluate_on_a_damaged_data_dir_exits_2_and_writes_nothing(tmp_path, data, trained_run, capsys):
    d = damaged(tmp_path, data, lambda d: (d / "val.idx").write_bytes((d / "val.idx").read_bytes()[:-8]))
    before, run_before = snapshot(tmp_path), snapshot(trained_run)
    code = cli.main(["evaluate", str(trained_run), "--data-dir", str(d), "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(rf"data/val\.idx is \d+ bytes .* truncated.*{REBUILD}", err), err
    assert snapshot(tmp_path) == before and snapshot(trained_run) == run_before


@pytest.mark.slow
def test_evaluate_refuses_a_data_dir_of_another_tokenizer(tmp_path, trained_run, other_data, capsys):
    run_before = snapshot(trained_run)
    code = cli.main(["evaluate", str(trained_run), "--data-dir", str(other_data), "--out",
                     str(tmp_path / "eval.json")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenized with another tokenizer" in err, err
    assert not (tmp_path / "eval.json").exists() and snapshot(trained_run) == run_before


# ------------------------------------------------------------------------------------------------ a run directory


def run_copy(tmp: Path, trained_run: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp / "run"))


def run_config_deleted(tmp, data, run):
    (run_copy(tmp, run) / "config.yaml").unlink()
    return r"run/config\.yaml is missing but .*checkpoints holds a run", "restore it .* or choose a new run_dir"


def run_config_unparsable(tmp, data, run):
    (run_copy(tmp, run) / "config.yaml").write_bytes(b"model: {preset: tiny\n\x00")
    return r"run/config\.yaml cannot be read", "restore it .* or choose a new run_dir"


def run_config_not_a_mapping(tmp, data, run):
    (run_copy(tmp, run) / "config.yaml").write_text("- 1\n")
    return r"run/config\.yaml is not a mapping", "restore it"


def data_symlink_repointed(tmp, data, run):
    """The run started on data behind a symlink; the link now points at other data of the same name."""
    copy = run_copy(tmp, run)
    (tmp / "link").symlink_to(data)
    saved = copy / "config.yaml"
    saved.write_text(saved.read_text().replace(f"data_dir: {data}\n", f"data_dir: {tmp / 'link'}\n"))
    other = damaged(tmp, data, lambda d: (d / "train.bin").write_bytes(  # same size, other tokens
        np.roll(np.fromfile(d / "train.bin", dtype=np.uint16), 7).tobytes()))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["fingerprint"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    (tmp / "link").unlink()
    (tmp / "link").symlink_to(other)
    return r"run was trained on other data than data_dir .*link holds now \(data_manifest_fingerprint differ", \
        "point data_dir at the data the run started on"


RUN_CASES = {f.__name__: f for f in [run_config_deleted, run_config_unparsable, run_config_not_a_mapping,
                                     data_symlink_repointed]}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_a_damaged_run_directory_exits_2_names_the_file_and_the_fix(case, tmp_path, data, trained_run, capsys):
    """A run directory with checkpoints whose config.yaml is gone or unreadable, or whose data_dir now holds other
    data: refused before anything is written (a missing config.yaml used to disable the settings guard, and a
    re-pointed symlink made a run finish on other data)."""
    names, fix = RUN_CASES[case](tmp_path, data, trained_run)
    data_dir = tmp_path / "link" if (tmp_path / "link").exists() else data
    before = snapshot(tmp_path)
    code = cli.main(["pretrain", str(pt_yaml(tmp_path, data_dir)), "--set", "train_tokens=1024"])
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if ": error: " in line]
    assert len(message) == 1, err
    assert re.search(names, message[0]) and re.search(fix, message[0]), message[0]
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "pt.yaml"} == before


# ------------------------------------------------------------------------------------------------ where outputs go


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs remounted ro): root ignores file modes, so chmod cannot make one."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("stage", ["preprocess", "pretrain", "study", "evaluate"])
def test_a_read_only_output_exits_2_naming_the_path(stage, tmp_path, data, trained_run, read_only_dir, capsys):
    """Each stage used to end in a PermissionError/OSError traceback on a read-only output directory."""
    out = read_only_dir / "out"
    argv = {"preprocess": ["preprocess", str(pre_yaml(tmp_path, ["stdlib"], "max_documents: 50\n")), "--set",
                           f"output_dir={out}"],
            "pretrain": ["pretrain", str(pt_yaml(tmp_path, data)), "--set", f"run_dir={out}"],
            "study": ["study", str(study_config_file(tmp_path, data, "[{model: tiny, train_tokens: 100000}]")), "--out",
                      str(out)],
            "evaluate": ["evaluate", str(trained_run), "--out", str(out / "eval.json")]}[stage]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    message = [line for line in err.splitlines() if ": error: " in line]
    assert len(message) == 1 and "Traceback" not in err, err
    assert re.search(rf"cannot write {read_only_dir}.*Read-only file system; make that directory writable", err)


def test_a_study_out_that_is_a_file_exits_2(tmp_path, data, capsys):
    (tmp_path / "afile").write_text("keep")
    code = cli.main(["study", str(study_config_file(tmp_path, data, "[{model: tiny, train_tokens: 100000}]")), "--out",
                     str(tmp_path / "afile")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"cannot write .*afile: Not a directory; a file stands where a directory", err)
    assert (tmp_path / "afile").read_text() == "keep"


def _planned_study(tmp: Path) -> Path:
    from cbs.pipeline import study
    from test_study import study_cfg

    runs = study.plan(study_cfg(batch_sizes=[4, 8, 16]), tmp / "s", tmp / "s" / "data")
    study.write_run_inputs(runs, tmp / "s")
    return tmp / "s" / "runs" / runs[0].name


@pytest.mark.parametrize("damage, names, fix", [
    (lambda run: (run / "run.yaml").write_text("global_batch_seqs: [4\n"), r"run\.yaml cannot be read",
     "writes every run.yaml from the study config"),
    (lambda run: (run / "run.yaml").write_bytes(b"a: 1\x00\n"), r"run\.yaml cannot be read",
     "writes every run.yaml"),
    (lambda run: (run / "result.json").write_text('{"status": "comp'), r"result\.json cannot be read",
     "resumes from its newest checkpoint"),
], ids=["run.yaml syntax", "run.yaml NUL byte", "result.json cut"])
def test_status_of_a_damaged_run_file_exits_2_naming_it(damage, names, fix, tmp_path, capsys):
    """`cbs status` used to end in a YAML traceback, or show a cut result.json as "failed" with exit 0."""
    damage(_planned_study(tmp_path))
    code = cli.main(["status", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(names, err) and re.search(fix, err) and "Traceback" not in err, err
