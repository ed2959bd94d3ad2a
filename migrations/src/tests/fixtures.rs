//! Stores of past schemas, byte for byte as that schema's code wrote them: compact JSON of
//! the model of the time (field order as declared, `skip_serializing_if` fields left out),
//! big-endian integers in META. Written once per schema and never edited: they are what
//! real stores hold.

/// A sled tree: its name and its (key, value) pairs.
pub(super) type Tree<'a> = (&'a str, &'a [(&'a [u8], &'a [u8])]);

/// Schema 1 (model of commit bae5709): no indexes. Covers every optional field absent,
/// present, and (for `Option`s) `null`; a wildcard service key; email identities in mixed
/// case, one twice; a URI with an `@`; a CN.
pub(super) const SCHEMA_1: &[Tree<'static>] = &[
    (
        "meta",
        &[
            (b"schema_version", b"\0\0\0\x01"),
            (b"config_version", b"\0\0\0\0\0\0\0\x07"),
            (b"audit_seq", b"\0\0\0\0\0\0\0\x01"),
        ],
    ),
    (
        "services",
        &[
            (
                b"*.apps.internal",
                br#"{"name":"*.apps.internal","protocol":"auto","groups":["admins","ops"]}"#,
            ),
            (
                b"dns.svc.internal",
                br#"{"name":"dns.svc.internal","protocol":"udp","address":null,"groups":[],"handler":null}"#,
            ),
            (b"min.svc.internal", br#"{"name":"min.svc.internal"}"#),
            (
                b"web.svc.internal",
                br#"{"name":"web.svc.internal","protocol":"tcp","address":":8080","groups":["ops"],"allow":["10.0.0.0/8"],"handler":"http"}"#,
            ),
        ],
    ),
    (
        "users",
        &[
            (
                b"alice",
                br#"{"name":"alice","identities":["Alice@Example.COM","spiffe://corp/alice","alice@example.com"],"groups":["admins","ops"],"disabled":true}"#,
            ),
            (b"bob", br#"{"name":"bob","identities":[],"groups":[]}"#),
            (
                b"carol",
                br#"{"name":"carol","identities":["Carol-CI","spiffe://corp/Carol@Build"],"groups":["ops"]}"#,
            ),
            (b"dave", br#"{"name":"dave"}"#),
        ],
    ),
    (
        "groups",
        &[
            (b"admins", br#"{"name":"admins"}"#),
            (b"ops", br#"{"name":"ops"}"#),
        ],
    ),
    ("revoked", &[(b"0a1b2c3d", b"")]),
    (
        "tokens",
        &[(
            b"0123456789abcdef",
            br#"{"id":"0123456789abcdef","name":"ci","created_ms":1763798400000,"hash":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#,
        )],
    ),
    (
        "audit",
        &[(
            b"\0\0\0\0\0\0\0\x01",
            br#"{"seq":1,"time_ms":1763798400000,"actor":{"token_id":"-","token_name":"ztp-control"},"action":"import","target":"","version":7}"#,
        )],
    ),
];

/// What migration 2 adds to [`SCHEMA_1`].
pub(super) const SCHEMA_1_INDEXES: &[Tree<'static>] = &[
    (
        "identities",
        &[
            (b"alice@example.com", b"alice"),
            (b"spiffe://corp/alice", b"alice"),
            (b"Carol-CI", b"carol"),
            (b"spiffe://corp/Carol@Build", b"carol"),
        ],
    ),
    (
        "group_refs",
        &[
            (b"admins\0s\0*.apps.internal", b""),
            (b"admins\0u\0alice", b""),
            (b"ops\0s\0*.apps.internal", b""),
            (b"ops\0s\0web.svc.internal", b""),
            (b"ops\0u\0alice", b""),
            (b"ops\0u\0carol", b""),
        ],
    ),
];

/// Schema 2 as written since commit 89238b5: schema 1's records plus a service's `deny`
/// (left out when empty), the two indexes, and `conn_audit`.
pub(super) const SCHEMA_2: &[Tree<'static>] = &[
    (
        "meta",
        &[
            (b"schema_version", b"\0\0\0\x02"),
            (b"config_version", b"\0\0\0\0\0\0\0\x03"),
        ],
    ),
    (
        "services",
        &[
            (
                b"db.svc.internal",
                br#"{"name":"db.svc.internal","protocol":"tcp","address":"10.0.0.5:5432","groups":["ops"],"allow":["10.0.0.0/8"],"deny":["10.9.0.0/16"]}"#,
            ),
            (
                b"web.svc.internal",
                br#"{"name":"web.svc.internal","protocol":"auto","address":":8080","groups":[]}"#,
            ),
        ],
    ),
    (
        "users",
        &[(
            b"alice",
            br#"{"name":"alice","identities":["Alice@Example.com"],"groups":["ops"]}"#,
        )],
    ),
    ("groups", &[(b"ops", br#"{"name":"ops"}"#)]),
    ("revoked", &[]),
    ("tokens", &[]),
    ("audit", &[]),
    ("identities", &[(b"alice@example.com", b"alice")]),
    (
        "group_refs",
        &[
            (b"ops\0s\0db.svc.internal", b""),
            (b"ops\0u\0alice", b""),
        ],
    ),
    ("conn_audit", &[]),
];

/// Schema 3 as written since the connector registry (issue 17): schema 2's trees, a
/// service naming a connector (`connector` left out when none), the registry (a
/// description left out when empty) and its index.
pub(super) const SCHEMA_3: &[Tree<'static>] = &[
    (
        "meta",
        &[
            (b"schema_version", b"\0\0\0\x03"),
            (b"config_version", b"\0\0\0\0\0\0\0\x05"),
        ],
    ),
    (
        "services",
        &[
            (
                b"db.svc.internal",
                br#"{"name":"db.svc.internal","protocol":"tcp","address":"10.1.2.3:5432","groups":["ops"],"connector":"lab"}"#,
            ),
            (
                b"web.svc.internal",
                br#"{"name":"web.svc.internal","protocol":"auto","address":":8080","groups":[]}"#,
            ),
        ],
    ),
    (
        "users",
        &[(
            b"alice",
            br#"{"name":"alice","identities":["Alice@Example.com"],"groups":["ops"]}"#,
        )],
    ),
    ("groups", &[(b"ops", br#"{"name":"ops"}"#)]),
    ("revoked", &[]),
    ("tokens", &[]),
    ("audit", &[]),
    ("identities", &[(b"alice@example.com", b"alice")]),
    (
        "group_refs",
        &[
            (b"ops\0s\0db.svc.internal", b""),
            (b"ops\0u\0alice", b""),
        ],
    ),
    ("conn_audit", &[]),
    (
        "connectors",
        &[
            (b"edge", br#"{"name":"edge"}"#),
            (b"lab", br#"{"name":"lab","description":"the lab's rack"}"#),
        ],
    ),
    ("connector_refs", &[(b"lab\0db.svc.internal", b"")]),
];
