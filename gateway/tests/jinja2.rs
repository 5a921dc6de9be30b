//! The chat-template renderer against Jinja2 set up as transformers sets it up
//! (`tests/data/jinja2_cases.json`, made by `tests/data/make_jinja2_cases.py`): Python-style
//! printing, string methods, slicing, `tojson` options, tool-call arguments of every JSON type,
//! and `raise_exception`.
#![allow(clippy::unwrap_used)]

use myriad_gateway::{ChatTemplate, TemplateError};
use serde_json::Value;

#[test]
fn renders_like_jinja2() {
    let text = include_str!("data/jinja2_cases.json");
    let cases: Value = serde_json::from_str(text).unwrap();
    let mut rendered = 0;
    let mut raised = 0;
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let template =
            ChatTemplate::new(case["template"].as_str().unwrap(), None, Some("<|im_end|>"))
                .unwrap();
        let tools = Some(&case["tools"]).filter(|t| !t.is_null());
        let result = template.render(
            &case["messages"],
            tools,
            case["add_generation_prompt"].as_bool().unwrap(),
            case["kwargs"].as_object().unwrap(),
        );
        match (result, case.get("expected"), case.get("error")) {
            (Ok(got), Some(want), _) => {
                assert_eq!(got, want.as_str().unwrap(), "{name}");
                rendered += 1;
            }
            (Err(TemplateError::Raised(message)), None, Some(error)) => {
                assert_eq!(
                    error.as_str().unwrap(),
                    format!("TemplateError: {message}"),
                    "{name}"
                );
                raised += 1;
            }
            (other, _, _) => panic!("{name}: got {other:?}, want {case}"),
        }
    }
    assert_eq!((rendered, raised), (13, 1));
}
