//! `liar`: Describes a parameter schema that is not a valid JSON Schema.

hostile::plugin!(schema: r#"{"type": "object", "properties": {"n": {"type": "a number, honestly"}}}"#, |parameters| {
    Ok(parameters)
});
