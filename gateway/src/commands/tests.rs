#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

fn checks(enabled: bool) -> Checks {
    let mut tags = HashMap::new();
    let access = |min, max| Some(WriteAccess { min, max });
    tags.insert(
        Arc::from("setpoint"),
        TagRule {
            tag: TagId(0),
            kind: Kind::Number,
            access: access(Some(-20.0), Some(80.0)),
        },
    );
    tags.insert(
        Arc::from("pump"),
        TagRule {
            tag: TagId(1),
            kind: Kind::Bool,
            access: access(None, None),
        },
    );
    tags.insert(
        Arc::from("level"),
        TagRule {
            tag: TagId(2),
            kind: Kind::Number,
            access: None,
        },
    );
    let mut devices = HashMap::new();
    devices.insert(
        Arc::from("press7"),
        DeviceRules {
            id: Some(DeviceId(3)),
            tags,
        },
    );
    Checks::new(enabled, Duration::from_secs(1), devices)
}

fn command(tag: &str, value: Value) -> Command {
    Command {
        id: "c1".into(),
        tag: tag.into(),
        value,
    }
}

#[test]
fn a_command_is_an_id_a_tag_and_a_value() {
    let c = parse(br#"{"id":"42","tag":"setpoint","value":21.5}"#).unwrap();
    assert_eq!(c, command("setpoint", Value::Float(21.5)).with_id("42"));
    assert_eq!(
        parse(br#"{"id":"a","tag":"t","value":true}"#)
            .unwrap()
            .value,
        Value::Bool(true)
    );
    assert_eq!(
        parse(br#"{"id":"a","tag":"t","value":-3}"#).unwrap().value,
        Value::Int(-3)
    );
    assert_eq!(
        parse(br#"{"id":"a","tag":"t","value":18446744073709551615}"#)
            .unwrap()
            .value,
        Value::UInt(u64::MAX)
    );
    assert_eq!(
        parse(br#"{"id":"a","tag":"t","value":"RUN"}"#)
            .unwrap()
            .value,
        Value::Text("RUN".into())
    );
}

impl Command {
    fn with_id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }
}

#[test]
fn payloads_that_are_no_command_are_refused_with_a_reason() {
    for bad in [
        &b""[..],
        b"null",
        b"[1,2]",
        br#"{"id":"a","tag":"t"}"#,
        br#"{"id":"a","tag":"t","value":1,"extra":0}"#,
        br#"{"id":1,"tag":"t","value":1}"#,
        b"\xff\xfe",
    ] {
        assert!(matches!(parse(bad), Err(ParseError::Json(_))), "{bad:?}");
    }
    assert!(matches!(
        parse(br#"{"id":"","tag":"t","value":1}"#),
        Err(ParseError::Id)
    ));
    let long = format!(r#"{{"id":"{}","tag":"t","value":1}}"#, "x".repeat(129));
    assert!(matches!(parse(long.as_bytes()), Err(ParseError::Id)));
    for value in ["null", "{}", "[1]"] {
        let p = format!(r#"{{"id":"a","tag":"t","value":{value}}}"#);
        assert!(matches!(parse(p.as_bytes()), Err(ParseError::Value)), "{p}");
    }
    assert_eq!(lenient_id(br#"{"id":"7","tag":"t"}"#).as_deref(), Some("7"));
    assert_eq!(lenient_id(b"nonsense"), None);
}

#[test]
fn a_writable_tag_within_its_range_is_accepted() {
    let mut c = checks(true);
    let now = Instant::now();
    let target = c
        .check("press7", &command("setpoint", Value::Float(21.5)), now)
        .unwrap();
    assert_eq!(
        target,
        Target {
            device: DeviceId(3),
            tag: TagId(0)
        }
    );
    assert!(c
        .check("press7", &command("pump", Value::Bool(true)), now)
        .is_ok());
}

#[test]
fn each_check_refuses_with_its_reason() {
    let now = Instant::now();
    let refused = |c: &mut Checks, device: &str, tag: &str, v: Value| {
        c.check(device, &command(tag, v), now).unwrap_err()
    };
    let mut off = checks(false);
    assert_eq!(
        refused(&mut off, "press7", "setpoint", Value::Float(1.0)),
        Refusal::Disabled
    );
    let mut c = checks(true);
    assert_eq!(
        refused(&mut c, "press8", "setpoint", Value::Float(1.0)),
        Refusal::UnknownDevice("press8".into())
    );
    assert_eq!(
        refused(&mut c, "press7", "speed", Value::Float(1.0)),
        Refusal::UnknownTag("speed".into())
    );
    assert_eq!(
        refused(&mut c, "press7", "level", Value::Float(1.0)),
        Refusal::NotWritable("level".into())
    );
    let wrong = refused(&mut c, "press7", "pump", Value::UInt(1));
    assert_eq!(wrong.to_string(), "tag `pump` takes a bool, not a number");
    assert_eq!(wrong.label(), "wrong_type");
    let low = refused(&mut c, "press7", "setpoint", Value::Float(-20.5));
    assert!(matches!(low, Refusal::BelowMin { .. }), "{low}");
    let high = refused(&mut c, "press7", "setpoint", Value::UInt(81));
    assert_eq!(
        high.to_string(),
        "81 is above write_max 80 of tag `setpoint`"
    );
    // The ends of the range are allowed.
    assert!(c
        .check("press7", &command("setpoint", Value::Int(-20)), now)
        .is_ok());
}

#[test]
fn a_tag_is_written_at_most_once_per_write_interval_and_refusals_do_not_count() {
    let mut c = checks(true);
    let t0 = Instant::now();
    // A refused command (out of range) does not start the interval.
    assert!(c
        .check("press7", &command("setpoint", Value::Float(99.0)), t0)
        .is_err());
    assert!(c
        .check("press7", &command("setpoint", Value::Float(1.0)), t0)
        .is_ok());
    let soon = c
        .check(
            "press7",
            &command("setpoint", Value::Float(2.0)),
            t0 + Duration::from_millis(400),
        )
        .unwrap_err();
    assert_eq!(
        soon,
        Refusal::TooSoon {
            tag: "setpoint".into(),
            interval: Duration::from_secs(1),
            wait: Duration::from_millis(600)
        }
    );
    // Another tag has its own interval.
    assert!(c
        .check(
            "press7",
            &command("pump", Value::Bool(true)),
            t0 + Duration::from_millis(400)
        )
        .is_ok());
    assert!(c
        .check(
            "press7",
            &command("setpoint", Value::Float(2.0)),
            t0 + Duration::from_secs(1)
        )
        .is_ok());
}

#[test]
fn a_write_the_driver_refused_does_not_hold_the_next_one_back() {
    let mut c = checks(true);
    let t0 = Instant::now();
    let target = c
        .check("press7", &command("setpoint", Value::Float(1.0)), t0)
        .unwrap();
    c.forget(&target);
    assert!(c
        .check("press7", &command("setpoint", Value::Float(2.0)), t0)
        .is_ok());
}

proptest! {
    #[test]
    fn any_bytes_parse_or_are_refused_without_panicking(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse(&bytes);
        let _ = lenient_id(&bytes);
    }

    #[test]
    fn any_json_shaped_text_parses_or_is_refused(
        id in ".{0,140}", tag in ".{0,20}", value in prop_oneof![
            Just("true".to_owned()), Just("null".to_owned()), any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| f.to_string()), ".{0,10}".prop_map(|s| format!("{s:?}")),
        ]
    ) {
        let payload = format!(r#"{{"id":{id:?},"tag":{tag:?},"value":{value}}}"#);
        if let Ok(c) = parse(payload.as_bytes()) {
            prop_assert!(!c.id.is_empty() && c.id.chars().count() <= MAX_ID_CHARS);
            let mut checks = checks(true);
            let _ = checks.check("press7", &c, Instant::now());
        }
    }
}

#[test]
fn a_tag_of_any_kind_takes_every_value_and_bounds_only_numbers() {
    // An OPC UA tag: the node's type is the server's, so the driver checks the kind.
    let mut tags = HashMap::new();
    let bounds = WriteAccess {
        min: Some(0.0),
        max: Some(10.0),
    };
    tags.insert(
        Arc::from("recipe"),
        TagRule {
            tag: TagId(0),
            kind: Kind::Any,
            access: Some(bounds),
        },
    );
    let rules = DeviceRules {
        id: Some(DeviceId(1)),
        tags,
    };
    let devices = HashMap::from([(Arc::from("oven"), rules)]);
    let mut checks = Checks::new(true, Duration::ZERO, devices);
    let now = Instant::now();
    for value in [
        Value::Bool(true),
        Value::Text("bake".into()),
        Value::UInt(10),
        Value::Float(0.0),
    ] {
        let target = checks.check("oven", &command("recipe", value.clone()), now);
        assert!(target.is_ok(), "{value:?}: {target:?}");
    }
    assert!(matches!(
        checks.check("oven", &command("recipe", Value::Float(10.5)), now),
        Err(Refusal::AboveMax { .. })
    ));
    assert!(matches!(
        checks.check("oven", &command("recipe", Value::Int(-1)), now),
        Err(Refusal::BelowMin { .. })
    ));
}
