//! The built-in kinds kubectl's typed clients send as protobuf (`kubectl create rolebinding`,
//! `kubectl create job`): the `k8s\0` envelope around a runtime.Unknown whose `raw` is the
//! object, read into JSON by the field numbers of k8s.io/api's generated.proto files. Only the
//! fields listed here are read; any other field is dropped (a documented simplification: these
//! are the fields kubectl sets for those two commands and the tests read).

use serde_json::{json, Map, Value};

use crate::refusal::Refusal;

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    Map,
    Msg(&'static str),
}

/// (field number, JSON name, kind, repeated)
type Field = (u64, &'static str, Kind, bool);

fn schema(message: &str) -> &'static [Field] {
    use Kind::*;
    match message {
        // k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto
        "ObjectMeta" => &[
            (1, "name", Str, false),
            (2, "generateName", Str, false),
            (3, "namespace", Str, false),
            (11, "labels", Map, false),
            (12, "annotations", Map, false),
            (13, "ownerReferences", Msg("OwnerReference"), true),
        ],
        "OwnerReference" => &[
            (1, "kind", Str, false),
            (3, "name", Str, false),
            (4, "uid", Str, false),
            (5, "apiVersion", Str, false),
            (6, "controller", Bool, false),
            (7, "blockOwnerDeletion", Bool, false),
        ],
        // k8s.io/api/rbac/v1/generated.proto
        "RoleBinding" => &[
            (1, "metadata", Msg("ObjectMeta"), false),
            (2, "subjects", Msg("Subject"), true),
            (3, "roleRef", Msg("RoleRef"), false),
        ],
        "Subject" => &[
            (1, "kind", Str, false),
            (2, "apiGroup", Str, false),
            (3, "name", Str, false),
            (4, "namespace", Str, false),
        ],
        "RoleRef" => &[
            (1, "apiGroup", Str, false),
            (2, "kind", Str, false),
            (3, "name", Str, false),
        ],
        // k8s.io/api/batch/v1/generated.proto
        "Job" => &[
            (1, "metadata", Msg("ObjectMeta"), false),
            (2, "spec", Msg("JobSpec"), false),
        ],
        "JobSpec" => &[
            (1, "parallelism", Int, false),
            (2, "completions", Int, false),
            (3, "activeDeadlineSeconds", Int, false),
            (5, "manualSelector", Bool, false),
            (6, "template", Msg("PodTemplateSpec"), false),
            (7, "backoffLimit", Int, false),
            (8, "ttlSecondsAfterFinished", Int, false),
            (9, "completionMode", Str, false),
            (10, "suspend", Bool, false),
            (14, "podReplacementPolicy", Str, false),
            (15, "managedBy", Str, false),
        ],
        // k8s.io/api/core/v1/generated.proto
        "PodTemplateSpec" => &[
            (1, "metadata", Msg("ObjectMeta"), false),
            (2, "spec", Msg("PodSpec"), false),
        ],
        "PodSpec" => &[
            (2, "containers", Msg("Container"), true),
            (3, "restartPolicy", Str, false),
            (4, "terminationGracePeriodSeconds", Int, false),
            (5, "activeDeadlineSeconds", Int, false),
            (8, "serviceAccountName", Str, false),
        ],
        "Container" => &[
            (1, "name", Str, false),
            (2, "image", Str, false),
            (3, "command", Str, true),
            (4, "args", Str, true),
            (5, "workingDir", Str, false),
            (7, "env", Msg("EnvVar"), true),
            (14, "imagePullPolicy", Str, false),
        ],
        "EnvVar" => &[
            (1, "name", Str, false),
            (2, "value", Str, false),
            (3, "valueFrom", Msg("EnvVarSource"), false),
        ],
        "EnvVarSource" => &[(1, "fieldRef", Msg("ObjectFieldSelector"), false)],
        "ObjectFieldSelector" => &[(1, "apiVersion", Str, false), (2, "fieldPath", Str, false)],
        "MapEntry" => &[(1, "k", Str, false), (2, "v", Str, false)],
        _ => &[],
    }
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Every field of a message, in order: (number, value).
fn wire_fields(mut msg: &[u8]) -> Option<Vec<(u64, Wire<'_>)>> {
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        let value = match key & 7 {
            0 => Wire::Varint(varint(&mut msg)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                msg = msg.get(n..)?;
                continue;
            }
            2 => {
                let len = usize::try_from(varint(&mut msg)?).ok()?;
                let v = msg.get(..len)?;
                msg = msg.get(len..)?;
                Wire::Bytes(v)
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

/// The first length-delimited field `number` of a message.
pub(crate) fn bytes_field(msg: &[u8], number: u64) -> Option<&[u8]> {
    wire_fields(msg)?.into_iter().find_map(|(n, w)| match w {
        Wire::Bytes(b) if n == number => Some(b),
        _ => None,
    })
}

fn message(msg: &[u8], name: &str) -> Option<Value> {
    let mut out = Map::new();
    for (n, w) in wire_fields(msg)? {
        let Some(&(_, key, kind, repeated)) = schema(name).iter().find(|f| f.0 == n) else {
            continue;
        };
        let v = match (kind, w) {
            // Go writes every string field, empty ones too; JSON leaves them out (omitempty).
            (Kind::Str, Wire::Bytes([])) if !repeated => continue,
            (Kind::Str, Wire::Bytes(b)) => Value::String(String::from_utf8_lossy(b).into_owned()),
            (Kind::Int, Wire::Varint(i)) => json!(i as i64),
            (Kind::Bool, Wire::Varint(i)) => json!(i != 0),
            (Kind::Msg(m), Wire::Bytes(b)) => message(b, m)?,
            (Kind::Map, Wire::Bytes(b)) => {
                let e = message(b, "MapEntry")?;
                let map = out.entry(key).or_insert_with(|| json!({}));
                map[e["k"].as_str().unwrap_or("")] = e.get("v").cloned().unwrap_or(json!(""));
                continue;
            }
            _ => return None,
        };
        if repeated {
            out.entry(key)
                .or_insert_with(|| json!([]))
                .as_array_mut()?
                .push(v);
        } else {
            out.insert(key.to_string(), v);
        }
    }
    Some(Value::Object(out))
}

/// A `kind` object sent as protobuf, as JSON; None when `kind` is not one read here.
pub(crate) fn object(body: &[u8], kind: &str, api_version: &str) -> Option<Result<Value, Refusal>> {
    if schema(kind).is_empty() {
        return None;
    }
    let bad = || Refusal::BadRequest(format!("invalid {kind} (protobuf)"));
    let read = || {
        let unknown = body.strip_prefix(b"k8s\0")?;
        let raw = bytes_field(unknown, 2)?;
        let mut v = message(raw, kind)?;
        v["apiVersion"] = json!(api_version);
        v["kind"] = json!(kind);
        Some(v)
    };
    Some(read().ok_or_else(bad))
}
