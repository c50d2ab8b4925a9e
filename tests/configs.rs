//! Every released PaliGemma variant's config parses to the values transformers 5.24 derives.

use paligemma::config::{GemmaVersion, PaliGemmaConfig};
use std::path::Path;

/// (file, text hidden, layers, heads, kv heads, head_dim, attention scale, image size) as
/// `PaliGemmaConfig.from_dict` reads them in transformers 5.24.
type Variant = (&'static str, usize, usize, usize, usize, usize, f64, usize);

const VARIANTS: &[Variant] = &[
    ("paligemma-3b-pt-224", 2048, 18, 8, 1, 256, 256.0, 224),
    ("paligemma-3b-pt-448", 2048, 18, 8, 1, 256, 256.0, 448),
    ("paligemma-3b-pt-896", 2048, 18, 8, 1, 256, 256.0, 896),
    ("paligemma2-3b-pt-224", 2304, 26, 8, 4, 256, 256.0, 224),
    ("paligemma2-3b-pt-448", 2304, 26, 8, 4, 256, 256.0, 448),
    ("paligemma2-3b-pt-896", 2304, 26, 8, 4, 256, 256.0, 896),
    ("paligemma2-10b-pt-224", 3584, 42, 16, 8, 256, 256.0, 224),
    ("paligemma2-10b-pt-448", 3584, 42, 16, 8, 256, 256.0, 448),
    ("paligemma2-10b-pt-896", 3584, 42, 16, 8, 256, 256.0, 896),
    ("paligemma2-28b-pt-224", 4608, 46, 32, 16, 128, 144.0, 224),
    ("paligemma2-28b-pt-448", 4608, 46, 32, 16, 128, 144.0, 448),
    ("paligemma2-28b-pt-896", 4608, 46, 32, 16, 128, 144.0, 896),
];

#[test]
fn every_released_variant_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs");
    for &(name, hidden, layers, heads, kv, head_dim, scalar, image) in VARIANTS {
        let c = PaliGemmaConfig::load(&dir.join(format!("{name}.json")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let t = &c.text;
        let got = (
            t.hidden_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.head_dim,
        );
        assert_eq!(got, (hidden, layers, heads, kv, head_dim), "{name}");
        assert_eq!(t.attention_scale(), scalar.powf(-0.5), "{name}");
        assert_eq!(t.vocab_size, 257216, "{name}");
        assert_eq!(c.image_token_index, 257152, "{name}");
        assert_eq!(
            (c.bos_token_id, c.pad_token_id, c.eos_token_ids.clone()),
            (2, 0, vec![1]),
            "{name}"
        );
        assert_eq!(c.projection_dim, hidden, "{name}");
        let v = &c.vision;
        let vision = (
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.patch_size,
        );
        assert_eq!(vision, (1152, 4304, 27, 16, 14), "{name}");
        assert_eq!(v.image_size, image, "{name}");
        assert_eq!(c.image_seq_length(), (image / 14) * (image / 14), "{name}");
        assert_eq!(t.rope_theta, 10000.0, "{name}");
        assert_eq!(t.max_position_embeddings, 8192, "{name}");
        if name.starts_with("paligemma2") {
            assert_eq!(t.version, GemmaVersion::Gemma2, "{name}");
            assert_eq!(t.attn_logit_softcapping, Some(50.0), "{name}");
            assert_eq!(t.final_logit_softcapping, Some(30.0), "{name}");
        } else {
            assert_eq!(t.version, GemmaVersion::Gemma1, "{name}");
            assert_eq!(t.final_logit_softcapping, None, "{name}");
        }
    }
}
