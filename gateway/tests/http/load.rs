//! What a node tells the proxy: `GET /internal/load` (unauthenticated, from the engine's
//! stats and the configured role) and the `x-myriad-path` header on every generation response.

use myriad_engine_api::{SchedulerStats, ServePath};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn the_load_report_comes_from_the_engine_without_a_key() {
    let mut c = config();
    c.role = "decode".into();
    c.api_keys = vec!["secret".into()];
    let s = start_with(c, None).await;
    s.engine.set_stats(Some(SchedulerStats {
        running: 3,
        waiting: 2,
        kv_blocks_used: 10,
        kv_blocks_total: 64,
        preemptions: 7,
        steps: 99,
        ..Default::default()
    }));
    let r = get(s.addr, "/internal/load").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"role": "decode", "running": 3, "waiting": 2, "kv_blocks_used": 10,
            "kv_blocks_total": 64, "preemptions": 7})
    );
    // The rest of the API still wants the key.
    assert_eq!(get(s.addr, "/v1/models").await.status, 401);

    // The default role is mixed.
    let s = start().await;
    assert_eq!(get(s.addr, "/internal/load").await.json()["role"], "mixed");
}

#[tokio::test]
async fn responses_say_which_path_served_them() {
    let s = start().await;
    s.engine.reply("Hello", true);
    // Prompts at least as long as `long` are "prefilled elsewhere"; a chat template adds far
    // fewer tokens than that.
    let long = "a long prompt about many things ".repeat(20);
    let threshold = tokenizer().encode(&long).unwrap().len();
    s.engine.set_path(move |r| {
        if r.prompt.len() >= threshold {
            ServePath::Disaggregated
        } else {
            ServePath::Direct
        }
    });
    let cases = [
        ("/v1/completions", json!({"prompt": "Hi"}), "direct"),
        ("/v1/completions", json!({"prompt": long}), "disaggregated"),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "stream": true}),
            "direct",
        ),
        // One long prompt among several makes the request disaggregated.
        (
            "/v1/completions",
            json!({"prompt": ["Hi", long], "stream": true}),
            "disaggregated",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
            "disaggregated",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
            "direct",
        ),
    ];
    for (path, mut body, expected) in cases {
        body["model"] = json!(MODEL);
        let r = post(s.addr, path, &body).await;
        assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
        assert_eq!(r.header("x-myriad-path"), Some(expected), "{path} {body}");
    }
    // A refused request has no path.
    let r = post(s.addr, "/v1/completions", &json!({"model": MODEL})).await;
    assert_eq!((r.status, r.header("x-myriad-path")), (400, None));
}
