//! The model fingerprint that nodes compare in their handshake (`Hello`): stable across
//! machines and builds, and covering exactly the shape an expert node must agree on.

use std::collections::BTreeSet;

use myriad_model::config::Family;
use myriad_model::presets::Preset;

#[test]
fn fingerprints_are_stable_and_cover_the_shared_shape() {
    let c = Preset::Mini512.config(Family::Qwen35Moe);
    // Pinned (cross-checked with an independent FNV-1a in Python): the same value on every
    // machine, process and build.
    assert_eq!(
        c.fingerprint(),
        0x7d9a_1330_b26c_ae51,
        "{:#018x}",
        c.fingerprint()
    );
    assert_eq!(c.clone().fingerprint(), c.fingerprint());

    let mut all = BTreeSet::new();
    for family in Family::ALL {
        for preset in Preset::ALL {
            assert!(
                all.insert(preset.config(family).fingerprint()),
                "{family:?} {preset:?}"
            );
        }
    }
    type Edit = fn(&mut myriad_model::ModelConfig);
    let edits: [Edit; 6] = [
        |c| c.hidden_size += 1,
        |c| c.num_layers += 1,
        |c| c.num_experts += 1,
        |c| c.num_experts_per_tok += 1,
        |c| c.moe_intermediate_size += 1,
        |c| c.vocab_size += 1,
    ];
    for edit in edits {
        let mut d = c.clone();
        edit(&mut d);
        assert_ne!(d.fingerprint(), c.fingerprint());
    }
    // Attention-only fields do not change what an expert node must agree on.
    let mut d = c.clone();
    d.rope_theta *= 2.0;
    d.max_position_embeddings += 1;
    assert_eq!(d.fingerprint(), c.fingerprint());
}
