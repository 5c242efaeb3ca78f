"""A corpus of real architectures, the kind users bring: Hugging Face transformers models built from
small configs (seeded random weights, nothing downloaded), plus plain-torch cases that trip tracers
(recurrent layers, depthwise convolutions, a shape check in forward, a closure over a mutated local).

Decoder models (GPT-2, Llama) are built with ``use_cache=False``, as for a single forward pass: with the
KV cache their forward also returns a ``DynamicCache`` object, which fxpress refuses with an error that
says exactly this. Every entry builds in well under a second and takes a batch size, so the same model can be compiled
at batch 1 and batch 4. ``transformers`` is a test extra: entries that need it raise ImportError with
what to install when it is missing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._seed import seeded


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[int], tuple]  # batch size -> inputs
    description: str
    source: str  # "transformers" | "torch"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf(config_name: str, model_name: str, **config):
    """A builder for transformers.<model_name>(transformers.<config_name>(**config)), seeded, eval."""

    def build() -> nn.Module:
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError("this corpus model needs `transformers` (pip install -e '.[test]')") from e
        cfg = getattr(transformers, config_name)(**config)
        # eager attention: the SDPA path picks kernels by runtime checks that tracers bake in.
        if hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
        with seeded(0):
            model = getattr(transformers, model_name)(cfg)
        return model.eval()

    return build


def _tokens(seq: int, vocab: int, mask: bool = True) -> Callable[[int], tuple]:
    def inputs(batch: int) -> tuple:
        ids = torch.randint(0, vocab, (batch, seq), generator=_gen())
        if not mask:
            return (ids,)
        # A padded mask: later rows are shorter, so masking really changes the numbers.
        m = torch.ones(batch, seq, dtype=torch.long)
        for b in range(batch):
            m[b, seq - 2 * b:] = 0 if b else 1
        return (ids, m)

    return inputs


def _images(channels: int, size: int) -> Callable[[int], tuple]:
    return lambda batch: (torch.randn(batch, channels, size, size, generator=_gen()),)


def _audio(samples: int) -> Callable[[int], tuple]:
    return lambda batch: (torch.randn(batch, samples, generator=_gen()),)


def _features(mels: int, frames: int) -> Callable[[int], tuple]:
    return lambda batch: (torch.randn(batch, mels, frames, generator=_gen()),)


_TXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


class WhisperEncoderOnly(nn.Module):
    """The Whisper encoder alone (audio features in, hidden states out)."""

    def __init__(self):
        super().__init__()
        import transformers

        cfg = transformers.WhisperConfig(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                                         max_source_positions=32, max_target_positions=32,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1)
        cfg._attn_implementation = "eager"
        self.encoder = transformers.WhisperModel(cfg).get_encoder()

    def forward(self, features):
        return self.encoder(features).last_hidden_state


def _whisper() -> nn.Module:
    with seeded(0):
        return WhisperEncoderOnly().eval()


# ----------------------------------------------------------------------------- plain-torch cases


class LSTMHead(nn.Module):
    """nn.LSTM(16, 32) then a Linear: the case that compiled to NaN on llvm."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y)


class GRUHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 8)

    def forward(self, x):
        y, _ = self.gru(x)
        return self.head(y[:, -1])


class DepthwiseNet(nn.Module):
    """Depthwise-separable blocks (MobileNet/EfficientNet style) with a Conv1d mixer at the end."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6()]
        for cin, cout, stride in [(16, 24, 2), (24, 32, 1), (32, 48, 2)]:
            layers += [nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin), nn.BatchNorm2d(cin),
                       nn.ReLU6(), nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)]
        self.features = nn.Sequential(*layers)
        self.mix = nn.Conv1d(48, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.features(x).flatten(2)           # (B, 48, H*W)
        y = torch.relu(self.mix(y)).mean(-1)      # (B, 32)
        return self.head(y)


class ShapeCheckedCNN(nn.Module):
    """A third-party-style CNN whose forward validates its input shape (symbolic_trace fails there)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        if x.shape[1] != 1 or x.shape[-1] != 8:
            raise ValueError(f"expected (B, 1, 8, 8) images, got {tuple(x.shape)}")
        y = torch.relu(self.conv1(x))
        y = torch.max_pool2d(torch.relu(self.conv2(y)), 2)
        y = torch.relu(self.fc1(y.flatten(1)))
        return self.fc2(y)


class NestedClosure(nn.Module):
    """torch.export's own example `nested_function`: a closure mutates a captured local in place."""

    def forward(self, a, b):
        x = a + b
        z = a - b

        def closure(y):
            nonlocal x
            x += 1
            return x * y + z

        return closure(x)


def _torch_model(cls) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with seeded(0):
            return cls().eval()

    return build


def _seq(features: int, steps: int) -> Callable[[int], tuple]:
    return lambda batch: (torch.randn(batch, steps, features, generator=_gen()),)


def _pair(*shape: int) -> Callable[[int], tuple]:
    return lambda batch: (torch.randn(batch, *shape, generator=_gen()), torch.randn(batch, *shape, generator=_gen(1)))


CORPUS: dict[str, CorpusSpec] = {}


def _add(name, build, inputs, description, source):
    CORPUS[name] = CorpusSpec(name, build, inputs, description, source)


_add("hf_bert", _hf("BertConfig", "BertModel", **_TXT), _tokens(16, 512), "BertModel 64x2", "transformers")
_add("hf_roberta", _hf("RobertaConfig", "RobertaModel", **_TXT, pad_token_id=1), _tokens(16, 512),
     "RobertaModel 64x2", "transformers")
_add("hf_distilbert", _hf("DistilBertConfig", "DistilBertModel", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                          hidden_dim=128, max_position_embeddings=64), _tokens(16, 512),
     "DistilBertModel 64x2", "transformers")
_add("hf_deberta_v2", _hf("DebertaV2Config", "DebertaV2Model", **_TXT), _tokens(16, 512),
     "DebertaV2Model 64x2", "transformers")
_add("hf_gpt2", _hf("GPT2Config", "GPT2Model", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, use_cache=False),
     # GPT2Model's second positional argument is past_key_values: ids only.
     _tokens(16, 512, mask=False), "GPT2Model 64x2 (Conv1D = addmm)", "transformers")
_add("hf_llama", _hf("LlamaConfig", "LlamaModel", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     max_position_embeddings=64, use_cache=False), _tokens(16, 512), "LlamaModel 64x2, GQA",
     "transformers")
_add("hf_t5_encoder", _hf("T5Config", "T5EncoderModel", vocab_size=512, d_model=64, d_kv=16, d_ff=128,
                          num_layers=2, num_heads=4), _tokens(16, 512), "T5EncoderModel 64x2", "transformers")
_add("hf_vit", _hf("ViTConfig", "ViTModel", image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), _images(3, 32),
     "ViTModel 64x2, 32x32", "transformers")
_add("hf_swin", _hf("SwinConfig", "SwinModel", image_size=32, patch_size=2, num_channels=3, embed_dim=16,
                    depths=[1, 1], num_heads=[2, 2], window_size=4), _images(3, 32), "SwinModel 16, 2 stages",
     "transformers")
_add("hf_convnext", _hf("ConvNextConfig", "ConvNextModel", num_channels=3, num_stages=2,
                        hidden_sizes=[16, 32], depths=[1, 1], image_size=32), _images(3, 32), "ConvNextModel 2 stages", "transformers")
_add("hf_resnet", _hf("ResNetConfig", "ResNetModel", num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                      depths=[1, 1], layer_type="basic"), _images(3, 32), "ResNetModel basic 2 stages",
     "transformers")
_add("hf_mobilenet_v2", _hf("MobileNetV2Config", "MobileNetV2Model", num_channels=3, image_size=64,
                            depth_multiplier=0.35), _images(3, 64), "MobileNetV2Model 0.35, 64x64", "transformers")
_add("hf_wav2vec2", _hf("Wav2Vec2Config", "Wav2Vec2Model", vocab_size=32, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, conv_dim=(16, 16), conv_stride=(5, 2),
                        conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                        do_stable_layer_norm=True, feat_extract_norm="layer"), _audio(400),
     "Wav2Vec2Model 64x2", "transformers")
_add("hf_whisper_encoder", _whisper, _features(16, 64), "Whisper encoder 64x2, 16 mels x 64 frames",
     "transformers")
_add("lstm_head", _torch_model(LSTMHead), _seq(16, 10), "nn.LSTM(16, 32) + Linear", "torch")
_add("gru_head", _torch_model(GRUHead), _seq(16, 10), "2-layer nn.GRU + Linear", "torch")
_add("depthwise_net", _torch_model(DepthwiseNet), _images(3, 32), "depthwise-separable CNN + Conv1d", "torch")
_add("shape_checked_cnn", _torch_model(ShapeCheckedCNN), lambda b: (torch.randn(b, 1, 8, 8, generator=_gen()),),
     "CNN with an input-shape check in forward", "torch")
_add("nested_closure", _torch_model(NestedClosure), _pair(4, 4), "closure mutating a captured local",
     "torch")


def corpus_names(source: str | None = None) -> list[str]:
    return [n for n, s in CORPUS.items() if source is None or s.source == source]


def get_corpus(name: str) -> CorpusSpec:
    if name not in CORPUS:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join(CORPUS)}")
    return CORPUS[name]
