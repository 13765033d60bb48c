"""Parameter names of real model families and the label the paper's rule gives each.

The paper updates the output head and the normalisation layers densely and selects small
weights in every other weight tensor; non-float leaves are never updated. Each family is a
list of ``(path, label)``: ``path`` as the family writes it (``/`` for Flax trees, ``.`` for
PyTorch / Hugging Face checkpoints); a ``"frozen"`` entry is built as an integer leaf, every
other entry as a float32 leaf. Names are the ones those models use (a few representative
layers each, not every layer).

``HEADS`` is what :func:`nanoadam_jax.labels.find_heads` says about each family's tree.
``KNOWN_MISSES`` lists real names the naming rule reads differently from the paper, with
the label it gives: they are the documented limits of a rule by name.
"""

from __future__ import annotations

S, D, F = "sparse", "dense", "frozen"

FAMILIES: dict[str, list[tuple[str, str]]] = {
    # flax.linen.MultiHeadDotProductAttention, auto-named; normalize_qk=True adds query_ln/key_ln.
    "linen_attention": [
        ("MultiHeadDotProductAttention_0/query/kernel", S),
        ("MultiHeadDotProductAttention_0/query/bias", S),
        ("MultiHeadDotProductAttention_0/key/kernel", S),
        ("MultiHeadDotProductAttention_0/value/kernel", S),
        ("MultiHeadDotProductAttention_0/out/kernel", S),
        ("MultiHeadDotProductAttention_0/out/bias", S),
        ("MultiHeadDotProductAttention_0/query_ln/scale", D),
        ("MultiHeadDotProductAttention_0/key_ln/scale", D),
        ("LayerNorm_0/scale", D),
        ("LayerNorm_0/bias", D),
        ("Dense_0/kernel", S),
    ],
    # flax.nnx.MultiHeadAttention's attributes inside a block.
    "nnx_attention": [
        ("blocks/0/attn/query/kernel", S),
        ("blocks/0/attn/key/kernel", S),
        ("blocks/0/attn/value/bias", S),
        ("blocks/0/attn/out/kernel", S),
        ("blocks/0/attn/query_ln/scale", D),
        ("blocks/0/norm1/scale", D),
        ("head/kernel", D),
    ],
    # Hugging Face BERT / MiniLM (BertForSequenceClassification).
    "bert": [
        ("bert.embeddings.word_embeddings.weight", S),
        ("bert.embeddings.position_embeddings.weight", S),
        ("bert.embeddings.token_type_embeddings.weight", S),
        ("bert.embeddings.LayerNorm.weight", D),
        ("bert.embeddings.LayerNorm.bias", D),
        ("bert.encoder.layer.3.attention.self.query.weight", S),
        ("bert.encoder.layer.3.attention.self.key.bias", S),
        ("bert.encoder.layer.3.attention.self.value.weight", S),
        ("bert.encoder.layer.3.attention.output.dense.weight", S),
        ("bert.encoder.layer.3.attention.output.LayerNorm.weight", D),
        ("bert.encoder.layer.3.intermediate.dense.weight", S),
        ("bert.encoder.layer.3.output.dense.weight", S),
        ("bert.encoder.layer.3.output.LayerNorm.bias", D),
        ("bert.pooler.dense.weight", S),  # a hidden layer before the head
        ("classifier.weight", D),
        ("classifier.bias", D),
    ],
    # This repository's MiniLM (examples/common/minilm.py), an NNX model.
    "minilm_nnx": [
        ("encoder/embeddings/word_embeddings/embedding", S),
        ("encoder/embeddings/embeddings_norm/scale", D),
        ("encoder/layers/0/attention/query/kernel", S),
        ("encoder/layers/0/attention/output/kernel", S),
        ("encoder/layers/0/attention_norm/scale", D),
        ("encoder/layers/0/intermediate/kernel", S),
        ("encoder/layers/0/output/kernel", S),
        ("encoder/layers/0/output_norm/bias", D),
        ("head/kernel", D),
    ],
    # Hugging Face GPT-2 (GPT2LMHeadModel); lm_head is tied to wte when loaded.
    "gpt2": [
        ("transformer.wte.weight", S),  # tied embedding: sparse by decision
        ("transformer.wpe.weight", S),
        ("transformer.h.0.ln_1.weight", D),
        ("transformer.h.0.attn.c_attn.weight", S),
        ("transformer.h.0.attn.c_attn.bias", S),
        ("transformer.h.0.attn.c_proj.weight", S),
        ("transformer.h.0.ln_2.bias", D),
        ("transformer.h.0.mlp.c_fc.weight", S),
        ("transformer.h.0.mlp.c_proj.weight", S),
        ("transformer.ln_f.weight", D),
        ("lm_head.weight", D),
    ],
    # Llama in Meta's naming (consolidated.*.pth).
    "llama_meta": [
        ("tok_embeddings.weight", S),
        ("layers.0.attention.wq.weight", S),
        ("layers.0.attention.wk.weight", S),
        ("layers.0.attention.wv.weight", S),
        ("layers.0.attention.wo.weight", S),
        ("layers.0.feed_forward.w1.weight", S),
        ("layers.0.feed_forward.w2.weight", S),
        ("layers.0.feed_forward.w3.weight", S),
        ("layers.0.attention_norm.weight", D),
        ("layers.0.ffn_norm.weight", D),
        ("norm.weight", D),
        ("output.weight", D),  # the LM head, at the root
    ],
    # Llama in Hugging Face's naming (LlamaForCausalLM); Qwen3 adds q_norm / k_norm.
    "llama_hf": [
        ("model.embed_tokens.weight", S),
        ("model.layers.0.self_attn.q_proj.weight", S),
        ("model.layers.0.self_attn.k_proj.weight", S),
        ("model.layers.0.self_attn.v_proj.weight", S),
        ("model.layers.0.self_attn.o_proj.weight", S),
        ("model.layers.0.self_attn.q_norm.weight", D),
        ("model.layers.0.self_attn.k_norm.weight", D),
        ("model.layers.0.mlp.gate_proj.weight", S),
        ("model.layers.0.mlp.up_proj.weight", S),
        ("model.layers.0.mlp.down_proj.weight", S),
        ("model.layers.0.input_layernorm.weight", D),
        ("model.layers.0.post_attention_layernorm.weight", D),
        ("model.norm.weight", D),
        ("lm_head.weight", D),
    ],
    # LlamaForSequenceClassification: the head is `score`, at the root.
    "llama_hf_classifier": [
        ("model.embed_tokens.weight", S),
        ("model.layers.0.self_attn.q_proj.weight", S),
        ("model.norm.weight", D),
        ("score.weight", D),
    ],
    # Gemma (google-deepmind/gemma, Flax); the embedder is tied to the output.
    "gemma": [
        ("transformer/embedder/input_embedding", S),  # tied embedding: sparse by decision
        ("transformer/layer_0/attn/q_einsum/w", S),
        ("transformer/layer_0/attn/kv_einsum/w", S),
        ("transformer/layer_0/attn/attn_vec_einsum/w", S),
        ("transformer/layer_0/attn/_query_norm/scale", D),  # Gemma 3
        ("transformer/layer_0/attn/_key_norm/scale", D),
        ("transformer/layer_0/mlp/gating_einsum", S),
        ("transformer/layer_0/mlp/linear", S),
        ("transformer/layer_0/pre_attention_norm/scale", D),
        ("transformer/layer_0/post_attention_norm/scale", D),
        ("transformer/layer_0/pre_ffw_norm/scale", D),
        ("transformer/layer_0/post_ffw_norm/scale", D),
        ("transformer/final_norm/scale", D),
    ],
    # Hugging Face T5 (T5ForConditionalGeneration, v1.1: untied lm_head).
    "t5": [
        ("shared.weight", S),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", S),
        ("encoder.block.0.layer.0.SelfAttention.k.weight", S),
        ("encoder.block.0.layer.0.SelfAttention.o.weight", S),
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", S),
        ("encoder.block.0.layer.0.layer_norm.weight", D),
        ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", S),
        ("encoder.block.0.layer.1.DenseReluDense.wo.weight", S),
        ("encoder.block.0.layer.1.layer_norm.weight", D),
        ("encoder.final_layer_norm.weight", D),
        ("decoder.block.0.layer.1.EncDecAttention.q.weight", S),
        ("decoder.final_layer_norm.weight", D),
        ("lm_head.weight", D),
    ],
    # ViT in big_vision / the original JAX code (Linen).
    "vit_flax": [
        ("embedding/kernel", S),
        ("cls", S),  # the class token: an embedding
        ("Transformer/posembed_input/pos_embedding", S),
        ("Transformer/encoderblock_0/LayerNorm_0/scale", D),
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel", S),
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel", S),
        ("Transformer/encoderblock_0/LayerNorm_2/bias", D),
        ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", S),
        ("Transformer/encoder_norm/scale", D),
        ("pre_logits/kernel", S),  # a hidden layer before the head
        ("head/kernel", D),
        ("head/bias", D),
    ],
    # ViT in Hugging Face's naming (ViTForImageClassification).
    "vit_hf": [
        ("vit.embeddings.cls_token", S),
        ("vit.embeddings.position_embeddings", S),
        ("vit.embeddings.patch_embeddings.projection.weight", S),
        ("vit.encoder.layer.0.layernorm_before.weight", D),
        ("vit.encoder.layer.0.attention.attention.query.weight", S),
        ("vit.encoder.layer.0.attention.output.dense.weight", S),
        ("vit.encoder.layer.0.layernorm_after.bias", D),
        ("vit.encoder.layer.0.output.dense.weight", S),
        ("vit.layernorm.weight", D),
        ("classifier.weight", D),
    ],
    # ViT / DeiT in timm's naming.
    "vit_timm": [
        ("cls_token", S),
        ("pos_embed", S),
        ("patch_embed.proj.weight", S),
        ("blocks.0.norm1.weight", D),
        ("blocks.0.attn.qkv.weight", S),
        ("blocks.0.attn.proj.weight", S),
        ("blocks.0.norm2.bias", D),
        ("blocks.0.mlp.fc1.weight", S),
        ("blocks.0.mlp.fc2.weight", S),
        ("norm.weight", D),
        ("head.weight", D),
    ],
    # torchvision ResNet without its `fc` (see KNOWN_MISSES).
    "resnet_torchvision": [
        ("conv1.weight", S),
        ("bn1.weight", D),
        ("bn1.bias", D),
        ("bn1.num_batches_tracked", F),  # an integer counter
        ("layer1.0.conv1.weight", S),
        ("layer1.0.bn2.weight", D),
        ("layer1.0.downsample.0.weight", S),
        ("layer4.1.bn3.bias", D),
    ],
    # ResNet of the Flax ImageNet example (Linen) without its auto-named `Dense_0` head.
    "resnet_flax": [
        ("conv_init/kernel", S),
        ("bn_init/scale", D),
        ("BottleneckResNetBlock_0/Conv_0/kernel", S),
        ("BottleneckResNetBlock_0/BatchNorm_0/scale", D),
        ("BottleneckResNetBlock_0/BatchNorm_2/bias", D),
        ("BottleneckResNetBlock_0/conv_proj/kernel", S),
        ("BottleneckResNetBlock_0/norm_proj/scale", D),
    ],
    # ConvNeXt in timm's naming.
    "convnext_timm": [
        ("stem.0.weight", S),
        ("stages.0.blocks.0.conv_dw.weight", S),
        ("stages.0.blocks.0.norm.weight", D),
        ("stages.0.blocks.0.mlp.fc1.weight", S),
        ("stages.0.blocks.0.mlp.fc2.weight", S),
        ("stages.0.blocks.0.gamma", S),
        ("head.norm.weight", D),
        ("head.fc.weight", D),
        ("head.fc.bias", D),
    ],
    # ConvNeXt in Hugging Face's naming.
    "convnext_hf": [
        ("convnext.embeddings.patch_embeddings.weight", S),
        ("convnext.embeddings.layernorm.weight", D),
        ("convnext.encoder.stages.0.layers.0.dwconv.weight", S),
        ("convnext.encoder.stages.0.layers.0.layernorm.weight", D),
        ("convnext.encoder.stages.0.layers.0.pwconv1.weight", S),
        ("convnext.encoder.stages.0.layers.0.pwconv2.weight", S),
        ("convnext.encoder.stages.0.layers.0.layer_scale_parameter", S),
        ("convnext.layernorm.weight", D),
        ("classifier.weight", D),
    ],
    # CLIP (OpenAI naming): norms with the position after the word.
    "clip": [
        ("visual.conv1.weight", S),
        ("visual.class_embedding", S),
        ("visual.ln_pre.weight", D),
        ("visual.transformer.resblocks.0.attn.in_proj_weight", S),
        ("visual.transformer.resblocks.0.ln_1.weight", D),
        ("visual.transformer.resblocks.0.mlp.c_fc.weight", S),
        ("visual.ln_post.bias", D),
        ("ln_final.weight", D),
        ("token_embedding.weight", S),
    ],
    # Names that contain a head or norm word without being one, and non-float leaves.
    "false_friends": [
        ("enormous_proj/kernel", S),
        ("header_proj/kernel", S),
        ("normal_init/kernel", S),
        ("normalize_proj/kernel", S),
        ("heads/kernel", S),
        ("MultiHeadDotProductAttention_0/query/kernel", S),
        ("pre_logits/kernel", S),
        ("blocks/0/output/kernel", S),  # `output` below the root is a hidden layer
        ("encoder/score/kernel", S),  # so is `score`
        ("fc/kernel", S),
        ("step", F),
        ("head_count", F),
    ],
}

#: What find_heads returns on the tree of each family (sorted).
HEADS: dict[str, list[str]] = {
    "linen_attention": [],  # the last layer is the auto-named Dense_0
    "nnx_attention": ["head"],
    "bert": ["classifier"],
    "minilm_nnx": ["head"],
    "gpt2": ["lm_head"],
    "llama_meta": ["output"],
    "llama_hf": ["lm_head"],
    "llama_hf_classifier": ["score"],
    "gemma": [],  # tied embedding
    "t5": ["lm_head"],
    "vit_flax": ["head"],
    "vit_hf": ["classifier"],
    "vit_timm": ["head"],
    "resnet_torchvision": [],
    "resnet_flax": [],
    "convnext_timm": ["head"],
    "convnext_hf": ["classifier"],
    "clip": [],  # contrastive: no classifier head
    "false_friends": [],
}

#: ``(path, label given by default_labels, label the paper's rule wants, why)``.
KNOWN_MISSES: list[tuple[str, str, str, str]] = [
    ("fc.weight", S, D, "torchvision ResNet's head; `fc` also names hidden layers"),
    ("layer1.0.downsample.1.weight", S, D, "torchvision ResNet's BatchNorm, known by index"),
    ("Dense_0/kernel", S, D, "Flax ImageNet ResNet's head, auto-named"),
    ("stem.1.weight", S, D, "timm ConvNeXt's stem LayerNorm, known by index"),
    ("classifier.0.weight", D, S, "VGG's hidden layers sit inside `classifier`"),
    ("cls.predictions.transform.dense.weight", S, D, "BERT's pretraining (MLM) head"),
    ("head_dist.weight", S, D, "timm DeiT's distillation head: `head` is not the last word"),
]
