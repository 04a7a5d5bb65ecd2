use super::*;
use proptest::prelude::*;

/// base64 of "password": the key of the worked example in Microsoft's Node.js IoT SDK tests
/// (Azure/azure-iot-sdk-node, common/core/test/_shared_access_signature_test.js).
const NODE_SDK_KEY: &str = "cGFzc3dvcmQ=";

/// The device key of the worked example in Microsoft's Java IoT SDK tests
/// (Azure/azure-iot-sdk-java, device/iot-device-client/src/test/java/tests/integration/com/
/// microsoft/azure/sdk/iot/device/net/SignatureIT.java).
const JAVA_SDK_KEY: &str = "q+DKVojmMz014RjAwpNGZbAkdOocSVWMKPOccLfUmLE=";

fn secret(text: &str) -> Secret {
    Secret::new(text.to_owned())
}

// Microsoft's documentation ("Control access to IoT Hub using Shared Access Signatures",
// https://learn.microsoft.com/en-us/azure/iot-hub/iot-hub-dev-guide-sas) gives the token's
// structure and a sample token, but not the key that signed it; the worked examples with a
// key and a known output are in Microsoft's own device SDKs' tests, cited above.

#[test]
fn the_token_matches_microsofts_node_sdk_worked_example() {
    let token = sas_token("uri", NODE_SDK_KEY, 12345).expect("a valid key");
    assert_eq!(
        token.expose(),
        "SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&se=12345"
    );
}

#[test]
fn the_signature_matches_microsofts_java_sdk_worked_example() {
    let sig = signature(
        JAVA_SDK_KEY,
        b"sdktesthub.private.azure-devices-int.net/devices/test8\n1462333672",
    )
    .expect("a valid key");
    assert_eq!(sig, "ZrTYgp6uRmbDl4lzzewxFD9FoaNKIK7G2bdivDbtc9A%3D");
}

#[test]
fn a_device_token_signs_the_url_encoded_resource_uri() {
    // The expected signature was computed independently with Python's standard library
    // (urllib.parse.quote, hmac, hashlib, base64), the way Microsoft's documentation shows.
    let uri = device_resource_uri("myhub.azure-devices.net", "device1");
    let token = sas_token(&uri, JAVA_SDK_KEY, 1456481802).expect("a valid key");
    assert_eq!(
        token.expose(),
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1\
         &sig=0y2cO5nhjw7jBJHIvOfDaQmz9B4lHmG8Tx9q2MVwM7A%3D&se=1456481802"
    );
}

#[test]
fn resource_uris_are_encoded_as_encode_uri_component_does() {
    let token = sas_token("h/devices/a b:c%d-e_f.g!h~i*j'k(l)", NODE_SDK_KEY, 1).expect("valid");
    let sr = token
        .expose()
        .strip_prefix("SharedAccessSignature sr=")
        .and_then(|rest| rest.split('&').next())
        .expect("an sr field");
    assert_eq!(sr, "h%2Fdevices%2Fa%20b%3Ac%25d-e_f.g!h~i*j'k(l)");
}

#[test]
fn whitespace_around_the_key_is_ignored() {
    let plain = sas_token("uri", NODE_SDK_KEY, 12345).expect("valid");
    let padded = sas_token("uri", " cGFzc3dvcmQ=\t\n", 12345).expect("valid");
    assert_eq!(plain.expose(), padded.expose());
}

#[test]
fn an_empty_key_is_a_clear_error() {
    assert_eq!(sas_token("uri", " \n", 1).err(), Some(SasError::EmptyKey));
}

#[test]
fn a_key_that_is_not_base64_says_where_without_showing_the_key() {
    let err = sas_token("uri", "hunter2#hunter2=", 1).expect_err("not base64");
    assert_eq!(err, SasError::KeyNotBase64(KeyDecodeProblem::Character(7)));
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        !shown.contains('#'),
        "the bad character is not shown: {shown}"
    );
    assert!(shown.contains("Azure portal"), "the fix is named: {shown}");
}

#[test]
fn a_token_prints_as_stars() {
    let token = sas_token("uri", NODE_SDK_KEY, 12345).expect("valid");
    assert_eq!(format!("{token:?} {token}"), "*** ***");
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn the_first_token_is_signed_at_once_and_renewed_at_80_percent_of_its_life() {
    let mut renewal = SasRenewal::new("uri".to_owned(), HOUR);
    assert!(renewal.due(1000), "no token yet");
    assert_eq!(renewal.renew_at(), None);
    let first = renewal.token(&secret(NODE_SDK_KEY), 1000).expect("valid");
    assert_eq!(first.expiry, 1000 + 3600);
    assert_eq!(first.renew_at, 1000 + 2880);
    assert!(first.token.expose().ends_with("&se=4600"));
    assert_eq!(renewal.renew_at(), Some(3880));
    assert_eq!(renewal.renew_in(1000), Duration::from_secs(2880));
}

#[test]
fn the_same_token_is_used_until_its_renewal_time() {
    let key = secret(NODE_SDK_KEY);
    let mut renewal = SasRenewal::new("uri".to_owned(), HOUR);
    let first = renewal.token(&key, 1000).expect("valid").token.clone();
    let later = renewal.token(&key, 3879).expect("valid");
    assert_eq!(later.token.expose(), first.expose());
    assert_eq!(later.expiry, 4600);
    assert!(!renewal.due(3879));
    assert!(renewal.due(3880));
    assert_eq!(renewal.renew_in(3880), Duration::ZERO);
}

#[test]
fn a_fresh_token_is_signed_once_the_renewal_time_is_reached() {
    let key = secret(NODE_SDK_KEY);
    let mut renewal = SasRenewal::new("uri".to_owned(), HOUR);
    let first = renewal.token(&key, 1000).expect("valid").token.clone();
    let fresh = renewal.token(&key, 3880).expect("valid");
    assert_ne!(fresh.token.expose(), first.expose());
    assert_eq!(fresh.expiry, 3880 + 3600);
    assert_eq!(fresh.renew_at, 3880 + 2880);
}

#[test]
fn a_clock_stepped_back_gets_a_fresh_token() {
    let key = secret(NODE_SDK_KEY);
    let mut renewal = SasRenewal::new("uri".to_owned(), HOUR);
    renewal.token(&key, 1_000_000).expect("valid");
    assert!(
        renewal.due(999_999),
        "signed with a clock now known to be wrong"
    );
    let fresh = renewal.token(&key, 999_999).expect("valid");
    assert_eq!(fresh.expiry, 999_999 + 3600);
}

#[test]
fn a_key_that_went_bad_keeps_the_token_in_use() {
    let mut renewal = SasRenewal::new("uri".to_owned(), HOUR);
    renewal.token(&secret(NODE_SDK_KEY), 1000).expect("valid");
    let err = renewal
        .token(&secret("not base64!"), 3880)
        .expect_err("the new key is refused");
    assert!(matches!(err, SasError::KeyNotBase64(_)));
    assert_eq!(
        renewal.renew_at(),
        Some(3880),
        "the old token is still there"
    );
}

#[test]
fn a_ttl_shorter_than_a_second_still_yields_tokens() {
    let mut renewal = SasRenewal::new("uri".to_owned(), Duration::from_millis(10));
    let token = renewal.token(&secret(NODE_SDK_KEY), 5).expect("valid");
    assert_eq!(token.expiry, 6);
    assert_eq!(token.renew_at, 5);
}

proptest! {
    #[test]
    fn any_key_text_yields_a_token_or_an_error_never_a_panic(key in any::<String>(), expiry in any::<u64>()) {
        let _ = sas_token("hub.azure-devices.net/devices/d", &key, expiry);
    }

    #[test]
    fn any_base64_key_yields_a_well_formed_token(
        key in proptest::collection::vec(any::<u8>(), 1..80),
        expiry in any::<u64>(),
    ) {
        let text = base64::engine::general_purpose::STANDARD.encode(&key);
        let token = sas_token("hub.azure-devices.net/devices/d", &text, expiry).expect("valid");
        let token = token.expose();
        let rest = token.strip_prefix("SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fd&sig=");
        prop_assert!(rest.is_some(), "{}", token);
        let rest = rest.unwrap_or_default();
        let expiry_field = format!("&se={expiry}");
        prop_assert!(rest.ends_with(&expiry_field));
        let sig = &rest[..rest.len() - expiry_field.len()];
        prop_assert!(!sig.contains(['+', '/', '=', '&']), "the signature is URL-encoded: {}", sig);
    }

    #[test]
    fn a_key_with_a_character_outside_base64_is_a_clear_error_that_hides_it(
        head in "[A-Za-z0-9+/]{0,20}",
        bad in "[#%&?:;,@$\\-_]",
        tail in "[A-Za-z0-9+/]{1,20}",
    ) {
        let key = format!("{head}{bad}{tail}");
        let err = sas_token("uri", &key, 1).expect_err("not base64");
        prop_assert!(matches!(err, SasError::KeyNotBase64(_)), "{:?}", err);
        let shown = format!("{err} {err:?}");
        if key.len() >= 8 {
            prop_assert!(!shown.contains(&key), "{}", shown);
        }
    }
}
