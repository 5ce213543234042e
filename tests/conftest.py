"""Shared fixtures. Checkpoint fixtures are named ckpt_* and build tiny real models
in temporary directories (nothing is downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's models are tiny: OpenMP threads only cost time, and on a busy
    2-core machine two spinning threads per process slow a test down many times."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ckpt_tiny_model() -> torch.nn.Module:
    """A small deterministic MLP with a norm layer (fp32, eval mode)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, 8),
    )
    return model.eval()


@pytest.fixture
def ckpt_mixed_state() -> dict[str, torch.Tensor]:
    """Tensors in every common stored dtype, with values that survive each dtype exactly."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(24, 16, generator=g)
    return {
        "enc.0.weight": base,
        "enc.0.bias": torch.randn(24, generator=g),
        "enc.1.weight": base.to(torch.bfloat16),
        "enc.2.weight": base.to(torch.float16),
        "enc.3.weight": base.to(torch.float8_e4m3fn),
        "quant.weight": torch.randint(-128, 128, (8, 16), generator=g, dtype=torch.int8),
        "step": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture(scope="session")
def ckpt_hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Llama saved by transformers as a sharded safetensors HF directory, and its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, max_shard_size="50KB")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return path, state


# -- model_* fixtures: runnable models, tokenizers and factories for hallway_audit.model --

MODEL_TEXTS = [
    "the cat sat on the mat",
    "a dog ran far away",
    "the bird sang",
    "on the mat a cat sat and the dog ran",
]

MODEL_FACTORY_SOURCE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class Tied(torch.nn.Module):
    """An embedding and an output head sharing one weight."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(12, 6)
        self.head = torch.nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def build():
    return Net()


def build_tied():
    return Tied()


def returns_dict():
    return {"net": Net()}


def explodes():
    raise RuntimeError("boom")


NOT_CALLABLE = 3
'''


def _model_word_tokenizer(path: Path, extra_specials: tuple[str, ...] = ()) -> None:
    """A WordLevel tokenizer trained on MODEL_TEXTS, saved the way transformers loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", *extra_specials]
    tok.train_from_iterator(MODEL_TEXTS, trainers.WordLevelTrainer(special_tokens=specials))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)


@pytest.fixture(scope="session")
def model_hf_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny LlamaForCausalLM (tied embeddings) + a WordLevel tokenizer in one HF directory, and the original model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
        _model_word_tokenizer(path)
    return path, model


@pytest.fixture(scope="session")
def model_hf_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny BertForSequenceClassification (3 classes, no tokenizer) in an HF directory, and the original."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("model") / "tiny-bert"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path, model


@pytest.fixture
def model_factory_file(tmp_path: Path) -> Path:
    """A Python file defining factories (build, build_tied, returns_dict, explodes, NOT_CALLABLE)."""
    path = tmp_path / "factories.py"
    path.write_text(MODEL_FACTORY_SOURCE, encoding="utf-8")
    return path


@pytest.fixture
def model_texts() -> list[str]:
    """The lines the model_hf_llama tokenizer was trained on (every word is in its vocabulary)."""
    return list(MODEL_TEXTS)
