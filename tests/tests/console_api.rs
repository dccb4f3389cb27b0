//! The console's JSON API over the gateway's real mTLS port, beside gRPC on the same port:
//! the operator is the one its client certificate names, the offline unblock answers the
//! vector's response, a one-time code and a card status change go through, refusals keep the
//! gateway's reason, and a custody outage reaches the operator as a plain sentence instead of
//! transport text.

mod console_common;

use std::time::Duration;

use cms_kit::client::Channel;
use cms_proto::common::v1::TypedCode;
use console_common::{Desk, groups};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceExt;

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    json: Value,
}

/// One HTTP/2 request on an mTLS channel, as a browser's would be.
async fn call(channel: &Channel, method: &str, path: &str, body: Option<Value>) -> Reply {
    let mut request = http::Request::builder().method(method).uri(path);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(tonic::body::Body::new(
            body.map(|b| b.to_string()).unwrap_or_default(),
        ))
        .expect("request");
    let response = channel
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

fn operator_channel(desk: &Desk, name: &str) -> Channel {
    let cluster = &desk.cluster;
    cms_tests::inproc::channel(
        cluster.pki.tls(&format!("operator/{name}")),
        cluster.grpc("gateway"),
        cluster.pki.id("gateway"),
    )
}

fn typed(bytes: &[u8]) -> TypedCode {
    TypedCode {
        hex: cms_cardcrypto::format_groups(bytes),
        checksum: cms_cardcrypto::checksum(bytes),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_api_runs_the_helpdesk_workflow_over_mtls() {
    let mut desk = Desk::start(false).await;
    let helpdesk = operator_channel(&desk, "helpdesk1");
    let approver = operator_channel(&desk, "approver1");

    // Who am I: the identity of the connection's certificate, never cached.
    let me = call(&helpdesk, "GET", "/api/v1/whoami", None).await;
    assert_eq!(me.status, 200, "{}", me.json);
    assert_eq!(me.json["operator"]["username"], "helpdesk1");
    assert_eq!(
        me.json["peer_identity"],
        "spiffe://cms.test/cms/operator/helpdesk1"
    );
    assert_eq!(me.headers["content-type"], "application/json");
    assert_eq!(me.headers["cache-control"], "no-store");
    assert_eq!(me.headers["x-content-type-options"], "nosniff");

    // gRPC still answers on the same port.
    let health = HealthClient::new(helpdesk.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cms.gateway.v1.HelpdeskService".into(),
        })
        .await
        .expect("gRPC health on the console's port")
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // Search, then the user's cards.
    let found = call(&helpdesk, "GET", "/api/v1/users?query=alice", None).await;
    assert_eq!(found.status, 200, "{}", found.json);
    assert_eq!(
        found.json["results"][0]["user"]["id"],
        desk.user.id.as_str()
    );
    let cards = call(
        &helpdesk,
        "GET",
        &format!("/api/v1/users/{}", desk.user.id),
        None,
    )
    .await;
    assert_eq!(cards.status, 200, "{}", cards.json);
    let card = &cards.json["cards"][0];
    assert_eq!(card["challenge_length"], 8);
    assert!(
        card["allowed_actions"]
            .as_array()
            .expect("actions")
            .contains(&json!("offline-response")),
        "{card}"
    );

    let unblock = format!(
        "/api/v1/users/{}/cards/{}/offline-response",
        desk.user.id, desk.card.id
    );
    let challenge = groups(&desk.code("challenge"));
    // A typo in the checksum: refused with its reason, the codes not echoed.
    let typo = call(
        &helpdesk,
        "POST",
        &unblock,
        Some(json!({ "challenge": challenge, "checksum": "0000" })),
    )
    .await;
    assert_eq!(typo.status, 400, "{}", typo.json);
    assert_eq!(typo.json["error"]["reason"], "CODE_CHECKSUM_MISMATCH");
    let text = typo.json.to_string();
    assert!(!text.contains(&desk.code("challenge")[..4]), "{text}");

    // The vector's challenge gives the vector's response, in groups of 4.
    let answer = call(
        &helpdesk,
        "POST",
        &unblock,
        Some(json!({
            "challenge": challenge.to_lowercase().replace(' ', "-"),
            "checksum": desk.code("challenge_checksum"),
            "ticket_reference": "INC-7",
        })),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(
        answer.json["response"]["groups"],
        groups(&desk.code("response"))
    );
    assert_eq!(
        answer.json["response"]["checksum"],
        desk.code("response_checksum")
    );
    assert_eq!(answer.headers["cache-control"], "no-store");

    // An operator without the helpdesk role: PERMISSION_DENIED becomes 403 with the reason.
    let fresh = typed(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
    let body = json!({ "challenge": fresh.hex, "checksum": fresh.checksum });
    let denied = call(&approver, "POST", &unblock, Some(body.clone())).await;
    assert_eq!(denied.status, 403, "{}", denied.json);
    assert_eq!(denied.json["error"]["code"], "PERMISSION_DENIED");
    assert!(
        denied.json["error"]["message"]
            .as_str()
            .expect("message")
            .contains("helpdesk"),
        "{}",
        denied.json
    );

    // A one-time code for the user's self-service: shown once, never cached.
    let otc = call(
        &helpdesk,
        "POST",
        &format!("/api/v1/users/{}/one-time-code", desk.user.id),
        Some(json!({ "credential_id": desk.card.id, "ticket_reference": "INC-7" })),
    )
    .await;
    assert_eq!(otc.status, 200, "{}", otc.json);
    assert!(!otc.json["code"].as_str().expect("code").is_empty());
    assert!(otc.json["expires_at"].is_string(), "{}", otc.json);
    assert_eq!(otc.headers["cache-control"], "no-store");

    // Custody down: the operator reads a plain sentence, not the transport's error.
    let index = desk
        .cluster
        .services
        .iter()
        .position(|s| s.name == "custody")
        .expect("custody");
    desk.cluster.services[index]
        .stop(Duration::from_secs(15))
        .await;
    let down = call(&helpdesk, "POST", &unblock, Some(body)).await;
    assert!(
        [503, 504].contains(&down.status),
        "{} {}",
        down.status,
        down.json
    );
    let message = down.json["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("A service behind the gateway"),
        "{message}"
    );
    for technical in ["tcp", "error trying", "os error", "transport", "127.0.0.1"] {
        assert!(!message.contains(technical), "{message}");
    }

    // Standard HTTP: unknown paths and wrong methods.
    let missing = call(&helpdesk, "GET", "/api/v1/nothing-here", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json["error"]["code"], "NOT_FOUND");
    let wrong = call(&helpdesk, "DELETE", "/api/v1/whoami", None).await;
    assert_eq!(wrong.status, 405);

    // The card reported lost (directory only; custody may be down).
    let lost = call(
        &helpdesk,
        "POST",
        &format!("/api/v1/cards/{}/status", desk.card.id),
        Some(json!({ "status": "lost", "reason": "left on a train" })),
    )
    .await;
    assert_eq!(lost.status, 200, "{}", lost.json);
    assert_eq!(lost.json["credential"]["status"], "lost");
    desk.cluster.stop().await;
}
