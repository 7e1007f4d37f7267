"""CLIPSIM and CLIP-Temp on a tiny random CLIP, against torchmetrics' CLIPScore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvd_bench.errors import UserError
from qvd_bench.evaluate.clipsim import (
    clip_protocol_id,
    clip_scores,
    image_embeddings,
    load_clip,
    text_embeddings,
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_clip_dir(path):
    """Writes a tiny random CLIP (model, tokenizer, image processor) to ``path``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n")]
    tokens += ["th", "the</w>", "an"]
    tokenizer = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokens),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tiny_clip_dir(tmp_path_factory.mktemp("clip"))
    model, processor = load_clip(path)
    return path, model, processor


class FeaturesAsTensors(nn.Module):
    """The same model; its get_*_features return the embedding tensors torchmetrics expects
    (transformers 5 returns model outputs whose pooler_output is the embedding)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def videos(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 4, 40, 36, 3), generator=g, dtype=torch.uint8)


PROMPTS = ["the cat ran", "an apple on the table"]


@torch.no_grad()
def test_clipsim_and_clip_temp_against_torchmetrics(clip):
    from torchmetrics.functional.multimodal import clip_score

    _, model, processor = clip
    v = videos(0)
    scores = clip_scores(model, processor, v, PROMPTS, batch_size=3)
    loader = lambda: (FeaturesAsTensors(model), processor)  # noqa: E731
    frames = [v[b, t].permute(2, 0, 1) for b in range(2) for t in range(4)]
    prompts = [p for p in PROMPTS for _ in range(4)]
    # CLIPScore = max(100 · mean cos, 0): over all frames with their prompts it is CLIPSIM.
    expected = float(clip_score(frames, prompts, loader))
    assert max(100 * scores.clipsim, 0.0) == pytest.approx(expected, abs=1e-4)
    # Frame by frame (some cosines are negative, and clamped by CLIPScore only).
    texts = text_embeddings(model, processor, PROMPTS)
    images = image_embeddings(model, processor, v.reshape(8, 40, 36, 3))
    cos = (images.reshape(2, 4, -1) * texts[:, None]).sum(-1)
    torch.testing.assert_close(cos.mean(1), scores.clipsim_per_video)
    for i, (frame, prompt) in enumerate(zip(frames, prompts)):
        one = float(clip_score(frame, prompt, loader))
        assert max(100 * float(cos.reshape(-1)[i]), 0.0) == pytest.approx(one, abs=1e-4)
    # CLIP-Temp: image-to-image CLIPScore of consecutive frames.
    pairs = [(v[b, t], v[b, t + 1]) for b in range(2) for t in range(3)]
    temp = clip_score(
        [a.permute(2, 0, 1) for a, _ in pairs], [b.permute(2, 0, 1) for _, b in pairs], loader
    )
    assert 100 * scores.clip_temp == pytest.approx(float(temp), abs=1e-4)
    assert scores.clip_temp > 0
    values = scores.as_dict()
    assert values["clipsim_x100"] == pytest.approx(100 * values["clipsim"])
    assert values["clip_temp_x100"] == pytest.approx(100 * values["clip_temp"])


def test_input_checks_and_one_frame(clip):
    _, model, processor = clip
    with pytest.raises(UserError, match="one prompt per video"):
        clip_scores(model, processor, videos(1), PROMPTS[:1])
    with pytest.raises(UserError, match="uint8 RGB videos"):
        clip_scores(model, processor, videos(1).float(), PROMPTS)
    single = clip_scores(model, processor, videos(1)[:, :1], PROMPTS)
    assert torch.isnan(single.clip_temp_per_video).all()


def test_missing_model_and_protocol_id(clip, tmp_path):
    path, _, _ = clip
    with pytest.raises(
        UserError, match=r"no CLIP model .*openai/clip-vit-base-patch32 from \S+ into a directory$"
    ):
        load_clip(tmp_path)
    with pytest.raises(UserError, match="no model directory given"):
        load_clip(None)
    assert clip_protocol_id(path).startswith(f"clipsim/{path.name}/sha256:")
