-- pilot-registry on PostgreSQL, schema version 1: one row per record, keyed as the registry
-- keys it. Node IDs are u32 (bigint with a range check), network IDs u16 (integer with a range
-- check), times are unix seconds. Uniqueness and references are checked when a transaction
-- commits (DEFERRABLE INITIALLY DEFERRED), so the order of the changes inside one batch does
-- not matter, and a batch that breaks one fails whole.

CREATE TABLE nodes (
    id           bigint  PRIMARY KEY CHECK (id BETWEEN 0 AND 4294967295),
    public_key   bytea   NOT NULL CHECK (octet_length(public_key) = 32),
    owner        text,
    -- The tunnel endpoint as the registry saw it ("ip:port", "[ip6]:port").
    real_addr    text,
    public       boolean NOT NULL,
    -- NULL when the node has none: hostnames are unique where present.
    hostname     text    CHECK (hostname <> ''),
    tags         text[]  NOT NULL DEFAULT '{}',
    polo_score   bigint  NOT NULL,
    task_exec    boolean NOT NULL,
    session_auth boolean NOT NULL,
    active       boolean NOT NULL,
    CONSTRAINT nodes_public_key_unique UNIQUE (public_key) DEFERRABLE INITIALLY DEFERRED,
    CONSTRAINT nodes_hostname_unique UNIQUE (hostname) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE networks (
    id        integer PRIMARY KEY CHECK (id BETWEEN 0 AND 65535),
    name      text    NOT NULL CHECK (name <> ''),
    join_rule text    NOT NULL CHECK (join_rule IN ('open', 'token', 'invite')),
    token     text,
    created   bigint  NOT NULL CHECK (created >= 0),
    -- 0 for the backbone and imported networks.
    creator   bigint  NOT NULL CHECK (creator BETWEEN 0 AND 4294967295),
    CONSTRAINT networks_name_unique UNIQUE (name) DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE members (
    net  integer NOT NULL REFERENCES networks (id) DEFERRABLE INITIALLY DEFERRED,
    node bigint  NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (net, node)
);
CREATE INDEX members_node ON members (node);

CREATE TABLE invites (
    net     integer NOT NULL REFERENCES networks (id) DEFERRABLE INITIALLY DEFERRED,
    node    bigint  NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    inviter bigint  NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    PRIMARY KEY (net, node)
);

-- One side's consent to a trust pair, keyed by the ordered pair (from, to); a pair is
-- trusted when both (a, b) and (b, a) are present.
CREATE TABLE consents (
    from_node bigint NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    to_node   bigint NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    at        bigint NOT NULL CHECK (at >= 0),
    PRIMARY KEY (from_node, to_node)
);
CREATE INDEX consents_to_node ON consents (to_node);

-- Trust requests waiting in their target's inbox.
CREATE TABLE inbox (
    target        bigint NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    requester     bigint NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    justification text   NOT NULL,
    at            bigint NOT NULL CHECK (at >= 0),
    PRIMARY KEY (target, requester)
);

-- Answers waiting for their requester.
CREATE TABLE responses (
    requester bigint  NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    responder bigint  NOT NULL REFERENCES nodes (id) DEFERRABLE INITIALLY DEFERRED,
    accept    boolean NOT NULL,
    at        bigint  NOT NULL CHECK (at >= 0),
    PRIMARY KEY (requester, responder)
);

-- The next node and network IDs to hand out.
CREATE TABLE counters (
    name  text   PRIMARY KEY CHECK (name IN ('next_node', 'next_net')),
    value bigint NOT NULL CHECK (value BETWEEN 0 AND 4294967295)
);
