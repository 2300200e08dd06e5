//! Numbers from the AMQP 0-9-1 specification (`amqp0-9-1.xml`, RabbitMQ's
//! errata): frame types, reply codes, class and method ids.

/// `AMQP\x00\x00\x09\x01`: the protocol header a 0-9-1 client opens with.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";
/// The 0-9 header (`AMQP\x01\x01\x00\x09`) some old clients send; RabbitMQ
/// treats it as 0-9-1.
pub const PROTOCOL_HEADER_0_9: [u8; 8] = *b"AMQP\x01\x01\x00\x09";

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Frame header (type, channel, size) plus the end octet.
pub const FRAME_OVERHEAD: usize = 8;
pub const FRAME_HEADER_SIZE: usize = 7;
/// The smallest frame_max a peer may negotiate.
pub const FRAME_MIN_SIZE: u32 = 4096;

pub mod reply {
    pub const SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

pub mod class {
    pub const CONNECTION: u16 = 10;
    pub const CHANNEL: u16 = 20;
    pub const ACCESS: u16 = 30;
    pub const EXCHANGE: u16 = 40;
    pub const QUEUE: u16 = 50;
    pub const BASIC: u16 = 60;
    pub const CONFIRM: u16 = 85;
    pub const TX: u16 = 90;
}

/// Method ids as `(class, method)` pairs.
pub mod method {
    pub type Id = (u16, u16);
    pub const CONNECTION_START: Id = (10, 10);
    pub const CONNECTION_START_OK: Id = (10, 11);
    pub const CONNECTION_SECURE: Id = (10, 20);
    pub const CONNECTION_SECURE_OK: Id = (10, 21);
    pub const CONNECTION_TUNE: Id = (10, 30);
    pub const CONNECTION_TUNE_OK: Id = (10, 31);
    pub const CONNECTION_OPEN: Id = (10, 40);
    pub const CONNECTION_OPEN_OK: Id = (10, 41);
    pub const CONNECTION_CLOSE: Id = (10, 50);
    pub const CONNECTION_CLOSE_OK: Id = (10, 51);
    pub const CONNECTION_BLOCKED: Id = (10, 60);
    pub const CONNECTION_UNBLOCKED: Id = (10, 61);
    pub const CONNECTION_UPDATE_SECRET: Id = (10, 70);
    pub const CHANNEL_OPEN: Id = (20, 10);
    pub const CHANNEL_OPEN_OK: Id = (20, 11);
    pub const CHANNEL_FLOW: Id = (20, 20);
    pub const CHANNEL_FLOW_OK: Id = (20, 21);
    pub const CHANNEL_CLOSE: Id = (20, 40);
    pub const CHANNEL_CLOSE_OK: Id = (20, 41);
    pub const EXCHANGE_DECLARE: Id = (40, 10);
    pub const QUEUE_DECLARE: Id = (50, 10);
    pub const QUEUE_DECLARE_OK: Id = (50, 11);
    pub const BASIC_QOS: Id = (60, 10);
    pub const BASIC_QOS_OK: Id = (60, 11);
    pub const BASIC_CONSUME: Id = (60, 20);
    pub const BASIC_CANCEL: Id = (60, 30);
    pub const BASIC_PUBLISH: Id = (60, 40);
    pub const BASIC_RETURN: Id = (60, 50);
    pub const BASIC_DELIVER: Id = (60, 60);
    pub const BASIC_GET: Id = (60, 70);
    pub const BASIC_GET_OK: Id = (60, 71);
    pub const BASIC_ACK: Id = (60, 80);
    pub const BASIC_RECOVER: Id = (60, 110);
    pub const BASIC_RECOVER_ASYNC: Id = (60, 100);
    pub const TX_COMMIT: Id = (90, 20);
    pub const TX_COMMIT_OK: Id = (90, 21);
    pub const EXCHANGE_DECLARE_OK: Id = (40, 11);
    pub const QUEUE_BIND: Id = (50, 20);
    pub const QUEUE_PURGE: Id = (50, 30);
    pub const QUEUE_DELETE: Id = (50, 40);
    pub const QUEUE_UNBIND: Id = (50, 50);
    pub const BASIC_CONSUME_OK: Id = (60, 21);
    pub const BASIC_CANCEL_OK: Id = (60, 31);
    pub const CONFIRM_SELECT: Id = (85, 10);
    pub const TX_SELECT: Id = (90, 10);

    /// Methods followed by a content header and body frames.
    pub fn has_content(id: Id) -> bool {
        matches!(
            id,
            BASIC_PUBLISH | BASIC_RETURN | BASIC_DELIVER | BASIC_GET_OK
        )
    }
}
