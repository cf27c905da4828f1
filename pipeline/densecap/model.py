"""The DenseCap-style model being trained: backbone + RPN + recognition network + caption LSTM, with its losses."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.densecap.config import TrainConfig
from pipeline.densecap.vocab import END, PAD, START
from pipeline.model.backbones import Backbone, build_backbone
from pipeline.model.proposals import proposal_recall
from pipeline.model.recognition import RegionDescriber
from pipeline.model.rpn import RPN, RPNLoss


class CaptionLSTM(nn.Module):
    """DenseCap's language model: an LSTM fed the region code, then ``<start>`` and the words (teacher forcing),
    predicting each next word and ``<end>``.

    Args:
        in_dim: region descriptor size.
        vocab_size: words including the special tokens.
        embed_dim: word (and region code) embedding size.
        hidden_dim: LSTM hidden size.
    """

    def __init__(self, in_dim: int, vocab_size: int, embed_dim: int = 512, hidden_dim: int = 512) -> None:
        super().__init__()
        self.args = {"in_dim": int(in_dim), "vocab_size": int(vocab_size), "embed_dim": int(embed_dim),
                     "hidden_dim": int(hidden_dim)}
        self.encode_region = nn.Linear(in_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def forward(self, desc: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets for teacher forcing.

        Args:
            desc: (n, in_dim) region descriptors.
            tokens: (n, L) word ids, ``<pad>``-padded.

        Returns:
            (logits (n, L' + 1, V), targets (n, L' + 1) with ``<end>`` after the words and ``<pad>`` after that),
            L' = the longest phrase of the batch.
        """
        lengths = (tokens != PAD).sum(1)
        L = int(lengths.max()) if tokens.numel() else 0
        tokens = tokens[:, :L]
        n = tokens.shape[0]
        start = tokens.new_full((n, 1), START)
        inputs = torch.cat([self.encode_region(desc).unsqueeze(1), self.embed(torch.cat([start, tokens], 1))], 1)
        hidden, _ = self.lstm(inputs)
        logits = self.out(hidden[:, 1:])  # the output after the region code is not a prediction
        targets = torch.cat([tokens, tokens.new_full((n, 1), PAD)], 1)
        targets[torch.arange(n, device=tokens.device), lengths] = END
        return logits, targets

    def loss(self, desc: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per predicted token (the words and ``<end>``)."""
        logits, targets = self(desc, tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)

    @torch.no_grad()
    def generate(self, desc: torch.Tensor, max_len: int = 15) -> torch.Tensor:
        """Greedy captions (n, max_len) of token ids (``<end>`` then ``<pad>`` after a finished caption)."""
        n = desc.shape[0]
        _, state = self.lstm(self.encode_region(desc).unsqueeze(1))
        word = desc.new_full((n,), START, dtype=torch.long)
        out = desc.new_full((n, max_len), PAD, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool, device=desc.device)
        for t in range(max_len):
            h, state = self.lstm(self.embed(word).unsqueeze(1), state)
            word = self.out(h[:, 0]).argmax(-1)
            out[:, t] = torch.where(done, torch.full_like(word, PAD), word)
            done |= word == END
            if bool(done.all()):
                break
        return out


class DenseCapModel(nn.Module):
    """Backbone + RPN localization layer + recognition network + caption LSTM, with DenseCap's training losses.

    ``forward`` returns the losses (so that DistributedDataParallel sees one module). The backbone's batch norms stay
    in eval mode (small per-GPU batches); with ``freeze_backbone`` its weights get no gradient. For VGG16 the
    recognition network's fc6/fc7 are trained (fine-tuned) either way.

    Args:
        cfg: the training config.
        vocab_size: caption vocabulary size.
        backbone: a built backbone (default: built from ``cfg``).
    """

    def __init__(self, cfg: TrainConfig, vocab_size: int, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.bb = backbone or build_backbone(cfg.backbone, random_weights=cfg.random_weights)
        self.features = self.bb.features
        self.freeze_backbone = cfg.freeze_backbone
        for p in self.features.parameters():
            p.requires_grad_(not cfg.freeze_backbone)
        self.rpn_args = {**cfg.anchors(), "mid_channels": cfg.rpn_channels}
        self.rpn = RPN(self.bb.channels, self.bb.stride, **self.rpn_args)
        self.recognition = RegionDescriber(self.bb, pool=cfg.region_pool, projection_dim=cfg.projection_dim)
        self.projection_dim = self.recognition.projection.out_features if self.recognition.projection is not None else 0
        dim = self.recognition.dim if self.recognition.dim > 0 else self.bb.channels
        self.caption = CaptionLSTM(dim, vocab_size, cfg.embed_dim, cfg.lstm_dim)
        self.rpn_loss = RPNLoss(self.rpn, cfg.rpn_batch, cfg.pos_iou, cfg.neg_iou)

    def train(self, mode: bool = True) -> "DenseCapModel":
        super().train(mode)
        self.features.eval()  # frozen batch-norm statistics, also when fine-tuning
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (float32; computed in bfloat16 on CUDA with ``amp``); no graph when the backbone
        is frozen. The heads run in float32 (box coordinates need its precision)."""
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.amp and x.device.type == "cuda")
        with amp, torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return self.features(x).float()

    def forward(self, x: torch.Tensor, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[torch.Tensor],
                tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """DenseCap's losses for a batch.

        Args:
            x: (B, 3, H, W) normalised, padded images.
            image_sizes: (height, width) of each image's valid pixels.
            boxes: per image (n_i, 4) ground-truth boxes in resized-image pixels.
            tokens: per image (n_i, L) their phrases' token ids.

        Returns:
            {"loss" (the weighted sum, with its graph), "objectness", "box", "caption" (detached)}.
        """
        fmap = self.feature_map(x)
        logits, deltas = self.rpn(fmap)
        h, w = fmap.shape[-2:]
        anchors = self.rpn.anchors(h, w, fmap.device)
        obj_terms, box_terms, rois, roi_tokens = [], [], [], []
        for i, size in enumerate(image_sizes):
            gt, tok = boxes[i], tokens[i]
            rpn = self.rpn_loss(anchors, logits[i], deltas[i], gt, size)
            obj_terms.append(rpn.objectness)
            box_terms.append(rpn.box)
            # Captioned regions: the ground truth and the positive anchors' predicted boxes (each with the phrase of
            # its matched box), a random subset of at most caption_regions.
            pred, matched = rpn.positive_boxes, rpn.positive_gt
            ok = ((pred[:, 2] - pred[:, 0]) >= 1) & ((pred[:, 3] - pred[:, 1]) >= 1)
            cand = torch.cat([gt, pred[ok]])
            cand_tok = torch.cat([tok, tok[matched[ok]]])
            pick = torch.randperm(cand.shape[0], device=cand.device)[: self.cfg.caption_regions]
            rois.append(cand[pick])
            roi_tokens.append(cand_tok[pick])
        desc = torch.cat(self.recognition(fmap, rois))
        caption = self.caption.loss(desc, torch.cat(roi_tokens))
        objectness = torch.stack(obj_terms).mean()
        box = torch.stack(box_terms).mean()
        c = self.cfg
        loss = c.objectness_weight * objectness + c.box_weight * box + c.caption_weight * caption
        return {"loss": loss, "objectness": objectness.detach(), "box": box.detach(), "caption": caption.detach()}

    @torch.no_grad()
    def evaluate_batch(self, x: torch.Tensor, image_sizes: Sequence[tuple[int, int]], boxes: Sequence[torch.Tensor],
                       tokens: Sequence[torch.Tensor], top_k: int) -> dict[str, float]:
        """Sums over a held-out batch: caption cross-entropy on the ground-truth boxes (summed over tokens), tokens,
        ground-truth boxes recalled at IoU 0.5 by the top-K proposals, ground-truth boxes."""
        fmap = self.feature_map(x)
        desc = torch.cat(self.recognition(fmap, list(boxes)))
        logits, targets = self.caption(desc, torch.cat(list(tokens)))
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
        hits = gt_total = 0.0
        for (props, _), gt in zip(self.rpn.propose(fmap, image_sizes, top_k), boxes):
            hits += proposal_recall(props, gt, 0.5) * gt.shape[0]
            gt_total += gt.shape[0]
        return {"caption_ce": float(ce), "caption_tokens": float((targets != PAD).sum()), "recall_hits": hits,
                "gt_boxes": gt_total}
