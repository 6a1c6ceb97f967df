//! Rendered manifests as JSON values, and the check that each one is a faithful Kubernetes object.

use serde_json::Value;

/// Every document of a multi-document YAML stream (empty documents left out).
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Parses `v` into its k8s-openapi type and back: nothing may be lost or changed (an unknown or
/// misspelt field would be).
pub fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
    let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:#}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, v,
        "{} {} lost or changed fields",
        v["kind"], v["metadata"]["name"]
    );
}

/// Merges `over` into `base` as Helm merges value files: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// The SPK procedure's `2/2 Running` dSSM pods: a sidecar that declares a port (and, like a
/// TLS exporter, mounts the certs Secret file by file with `subPath`) listed before the Redis
/// container, which mounts the Secrets as directories. Returns once every dSSM pod runs the new
/// template and is Ready.
pub fn dssm_sidecar_first(server: &super::apiserver::ApiServer, ns: &str) {
    use serde_json::json;
    for (app, port) in [
        ("f5-dssm-db", ("redis", 6379)),
        ("f5-dssm-sentinel", ("sentinel", 26379)),
    ] {
        let mut w = server.get("apps", "statefulsets", ns, app).unwrap();
        w["spec"]["template"]["spec"] = json!({
            "containers": [
                {"name": "exporter", "image": "redis-exporter",
                 "ports": [{"name": "metrics", "containerPort": 9121}],
                 "volumeMounts": [{"name": "certs", "mountPath": "/tls/ca.crt", "subPath": "dssm-ca.crt"}]},
                {"name": "f5-dssm-store", "image": "f5-dssm-store",
                 "ports": [{"name": port.0, "containerPort": port.1}],
                 "volumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/certs"},
                                  {"name": "keys", "mountPath": "/etc/ssl/private"}]}],
            "volumes": [{"name": "certs", "secret": {"secretName": "dssm-certs-secret"}},
                        {"name": "keys", "secret": {"secretName": "dssm-keys-secret"}}]
        });
        server.put("apps", "statefulsets", ns, w);
    }
    let pods = super::apiserver::resource("", "pods");
    server.wait_until(
        "the dSSM pods on the sidecar-first template, Ready",
        std::time::Duration::from_secs(60),
        |s| {
            let dssm: Vec<_> = s
                .list(pods, Some(ns))
                .into_iter()
                .filter(|p| {
                    p["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("f5-dssm-"))
                })
                .collect();
            dssm.len() == 6
                && dssm.iter().all(|p| {
                    p["spec"]["containers"][0]["name"] == "exporter"
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && p["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
        },
    );
}
