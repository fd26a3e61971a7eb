use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

/// A frame with a correct CRC around any type, flags and payload.
fn raw_frame(msg_type: u16, flags: u16, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u32_le(FRAME_MAGIC);
    b.put_u16_le(msg_type);
    b.put_u16_le(flags);
    b.put_u32_le(payload.len() as u32);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[4..12]), payload);
    b.put_u32_le(crc);
    b.put_slice(payload);
    b
}

fn enc(m: &Message) -> BytesMut {
    let mut b = BytesMut::new();
    encode(m, &mut b).expect("encodable");
    b
}

fn arb_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Primary), Just(Role::Secondary)]
}

fn arb_disk() -> impl Strategy<Value = DiskState> {
    prop_oneof![
        Just(DiskState::UpToDate),
        Just(DiskState::Consistent),
        Just(DiskState::Outdated),
        Just(DiskState::Inconsistent),
        Just(DiskState::Diskless),
        Just(DiskState::Unknown),
    ]
}

fn arb_refuse() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        Just(RefuseReason::WrongSecret),
        Just(RefuseReason::WrongResource),
        Just(RefuseReason::WrongPeer),
        Just(RefuseReason::SizeMismatch),
        Just(RefuseReason::BlockSizeMismatch),
        Just(RefuseReason::IncompatibleVersion),
        Just(RefuseReason::AlreadyConnected),
        Just(RefuseReason::Other),
    ]
}

fn arb_goodbye() -> impl Strategy<Value = GoodbyeReason> {
    prop_oneof![
        Just(GoodbyeReason::Shutdown),
        Just(GoodbyeReason::Disconnect),
        Just(GoodbyeReason::SplitBrain),
        Just(GoodbyeReason::UnrelatedData),
        Just(GoodbyeReason::ProtocolError),
        Just(GoodbyeReason::Other),
    ]
}

fn arb_name() -> impl Strategy<Value = String> {
    // Up to 255 bytes of UTF-8 (multi-byte chars included).
    "[a-zA-Z0-9_.é-]{1,120}"
}

fn arb_data() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

fn arb_hello() -> impl Strategy<Value = Message> {
    (
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u64>(), any::<u32>()),
        (arb_role(), arb_disk(), any::<u64>(), any::<u64>(), any::<[u64; 4]>(), any::<[u8; 32]>()),
        (arb_name(), arb_name(), arb_name()),
    )
        .prop_map(
            |(
                (min_version, max_version, flags, size, block_size),
                (role, disk, current, bitmap, history, nonce),
                (resource, node, peer),
            )| {
                Message::Hello(Box::new(Hello {
                    min_version,
                    max_version,
                    flags,
                    resource,
                    node,
                    peer,
                    size,
                    block_size,
                    gen_ids: GenIds { current, bitmap, history },
                    role,
                    disk,
                    nonce,
                }))
            },
        )
}

fn arb_kind() -> impl Strategy<Value = ResyncKind> {
    prop_oneof![Just(ResyncKind::Log), Just(ResyncKind::Bitmap), Just(ResyncKind::Full)]
}

fn arb_sync_info() -> impl Strategy<Value = Message> {
    (
        (arb_role(), arb_disk(), 12u32..=20, 0u32..8),
        (any::<u64>(), any::<u64>(), any::<[u64; 4]>(), any::<u64>()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(|((role, disk, shift, flags), (current, bitmap, history, gen_created_ms), (a, b, c, d))| {
            Message::SyncInfo(Box::new(SyncInfo {
                role,
                disk,
                granularity: 1 << shift,
                flags,
                gen_ids: GenIds { current, bitmap, history },
                gen_created_ms,
                local_lsn: a,
                dirty_bytes: b,
                bitmap_base_lsn: c,
                log_first_lsn: d,
            }))
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello(),
        any::<[u8; 32]>().prop_map(|mac| Message::Auth { mac }),
        any::<u16>().prop_map(|version| Message::Welcome { version }),
        (arb_refuse(), ".{0,200}").prop_map(|(reason, message)| Message::Refuse { reason, message }),
        (arb_role(), arb_disk(), any::<u64>()).prop_map(|(role, disk, out_of_sync_bytes)| Message::State {
            role,
            disk,
            out_of_sync_bytes
        }),
        (any::<u64>(), any::<u64>(), any::<bool>(), arb_data()).prop_map(|(lsn, offset, fua, data)| Message::Write {
            lsn,
            offset,
            fua,
            data
        }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>()).prop_map(|(lsn, offset, len, fua)| Message::Trim {
            lsn,
            offset,
            len,
            fua
        }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>())
            .prop_map(|(lsn, offset, len, punch, fua)| Message::Zeroes { lsn, offset, len, punch, fua }),
        any::<u64>().prop_map(|upto_lsn| Message::Barrier { upto_lsn }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(received, written, durable)| Message::Ack {
            received,
            written,
            durable
        }),
        arb_sync_info(),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..40))
            .prop_map(|(first_word, words)| Message::BitmapChunk { first_word: first_word >> 8, words }),
        any::<u64>().prop_map(|total_words| Message::BitmapEnd { total_words }),
        (arb_kind(), any::<u64>(), any::<u64>()).prop_map(|(kind, total_bytes, start_lsn)| Message::SyncStart {
            kind,
            total_bytes,
            start_lsn
        }),
        (any::<u64>(), arb_data()).prop_map(|(offset, data)| Message::SyncData { offset, data }),
        any::<u64>().prop_map(|bytes| Message::SyncEnd { bytes }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(done_bytes, written_bytes)| Message::SyncAck { done_bytes, written_bytes }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_ns)| Message::Ping { seq, sent_ns }),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_ns)| Message::Pong { seq, sent_ns }),
        (arb_goodbye(), ".{0,200}").prop_map(|(reason, message)| Message::Goodbye { reason, message }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in arb_message()) {
        let mut b = enc(&m);
        prop_assert_eq!(b.len(), m.encoded_len());
        prop_assert_eq!(decode(&mut b), Ok(Some(m)));
        prop_assert!(b.is_empty());
    }

    #[test]
    fn a_stream_of_messages_decodes_in_order(ms in prop::collection::vec(arb_message(), 1..12)) {
        let mut b = BytesMut::new();
        for m in &ms {
            encode(m, &mut b).expect("encodable");
        }
        for m in &ms {
            prop_assert_eq!(decode(&mut b), Ok(Some(m.clone())));
        }
        prop_assert_eq!(decode(&mut b), Ok(None));
    }

    #[test]
    fn partial_frames_wait_for_the_rest(m in arb_message()) {
        let full = enc(&m);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            prop_assert_eq!(decode(&mut b), Ok(None), "prefix of {} bytes", cut);
            prop_assert_eq!(&b[..], &full[..cut], "a partial frame is left in place");
        }
        let mut b = full.clone();
        prop_assert_eq!(decode(&mut b), Ok(Some(m)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut b = BytesMut::from(&raw[..]);
        // Decode until an error or "need more": never a panic.
        for _ in 0..raw.len() + 1 {
            match decode(&mut b) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_payloads_behind_a_valid_header_never_panic(
        t in prop_oneof![1u16..=100, any::<u16>()],
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = raw_frame(t, 0, &payload);
        match decode(&mut b) {
            Ok(Some(m)) => {
                // Whatever decodes is a valid message: it round-trips. (Not
                // necessarily to the same bytes: an unknown reason code reads
                // as Other.)
                let mut again = enc(&m);
                prop_assert_eq!(decode(&mut again), Ok(Some(m)));
            }
            Ok(None) => prop_assert!(false, "a whole frame is never 'incomplete'"),
            Err(_) => {}
        }
    }

    #[test]
    fn any_single_bit_flip_is_rejected(m in arb_message(), pick in any::<prop::sample::Index>()) {
        let good = enc(&m);
        let bit = pick.index(good.len() * 8);
        let mut bad = good.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        match decode(&mut bad) {
            Err(_) => {}
            Ok(Some(other)) => prop_assert!(false, "bit {} flipped decoded as {:?}", bit, other),
            Ok(None) => {
                // Only a larger length can look like "wait for more"; once
                // the announced bytes arrive, the CRC rejects the frame.
                prop_assert!((64..96).contains(&bit), "bit {} flip waits for more", bit);
                let announced = u32::from_le_bytes([bad[8], bad[9], bad[10], bad[11]]) as usize;
                let total = FRAME_HEADER_LEN + announced;
                prop_assert!(total > bad.len());
                if total <= 4 << 20 {
                    bad.resize(total, 0);
                    let r = decode(&mut bad);
                    prop_assert!(matches!(r, Err(FrameError::BadCrc { .. })), "{:?}", r);
                }
            }
        }
    }
}

#[test]
fn ping_frame_bytes_are_pinned() {
    // The documented layout, byte by byte (docs/replication-protocol.md).
    let b = enc(&Message::Ping { seq: 0x0102, sent_ns: 7 });
    let mut expect = vec![b'R', b'B', b'R', b'P', 80, 0, 0, 0, 16, 0, 0, 0];
    let crc = crc32c::crc32c(&[80, 0, 0, 0, 16, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
    expect.extend_from_slice(&crc.to_le_bytes());
    expect.extend_from_slice(&[2, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&b[..], &expect[..]);
}

#[test]
fn write_layout_puts_data_last() {
    let m = Message::Zeroes { lsn: 9, offset: 4096, len: 512, punch: true, fua: true };
    let b = enc(&m);
    assert_eq!(b.len(), FRAME_HEADER_LEN + 21);
    assert_eq!(&b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 8], &9u64.to_le_bytes());
    assert_eq!(&b[FRAME_HEADER_LEN + 16..FRAME_HEADER_LEN + 20], &512u32.to_le_bytes());
    assert_eq!(b[FRAME_HEADER_LEN + 20], OP_FLAG_FUA | OP_FLAG_PUNCH);

    let w = Message::Write { lsn: 1, offset: 2, fua: false, data: Bytes::from_static(b"abc") };
    let b = enc(&w);
    assert_eq!(&b[b.len() - 3..], b"abc");
}

#[test]
fn garbage_is_refused_after_the_first_bytes() {
    let mut b = BytesMut::from(&b"GE"[..]);
    assert_eq!(decode(&mut b), Err(FrameError::BadMagic { found: u32::from_le_bytes(*b"GE\0\0") }));
    let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    assert!(matches!(decode(&mut b), Err(FrameError::BadMagic { .. })));
    // A correct partial magic is not an error yet.
    let mut b = BytesMut::from(&b"RBR"[..]);
    assert_eq!(decode(&mut b), Ok(None));
}

#[test]
fn oversized_frames_are_refused_from_the_header_alone() {
    let mut b = BytesMut::new();
    b.put_u32_le(FRAME_MAGIC);
    b.put_u16_le(msg_type::WRITE);
    b.put_u16_le(0);
    b.put_u32_le(MAX_PAYLOAD_LEN as u32 + 1);
    b.put_u32_le(0);
    assert_eq!(
        decode(&mut b),
        Err(FrameError::TooLarge { msg_type: msg_type::WRITE, len: MAX_PAYLOAD_LEN as u32 + 1, max: MAX_PAYLOAD_LEN })
    );
}

#[test]
fn unknown_types_and_flags_are_refused() {
    let mut b = raw_frame(999, 0, b"xyz");
    assert_eq!(decode(&mut b), Err(FrameError::UnknownType { msg_type: 999, len: 3 }));
    let mut b = raw_frame(msg_type::BARRIER, 0x8000, &5u64.to_le_bytes());
    assert_eq!(decode(&mut b), Err(FrameError::UnknownFrameFlags { msg: "barrier", flags: 0x8000 }));
}

#[test]
fn malformed_payloads_name_the_message_and_field() {
    let mut b = raw_frame(msg_type::ACK, 0, &[0u8; 20]);
    match decode(&mut b) {
        Err(FrameError::Malformed { msg: "ack", detail }) => assert!(detail.contains("durable"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // Trailing bytes after the last field.
    let mut b = raw_frame(msg_type::BARRIER, 0, &[0u8; 9]);
    assert!(matches!(decode(&mut b), Err(FrameError::Malformed { msg: "barrier", .. })));
    // Unknown op flag bits.
    let mut p = Vec::new();
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&8u32.to_le_bytes());
    p.push(0x04);
    let mut b = raw_frame(msg_type::TRIM, 0, &p);
    assert!(matches!(decode(&mut b), Err(FrameError::Malformed { msg: "trim", .. })));
    // Unknown role code.
    let mut b = raw_frame(msg_type::STATE, 0, &[9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(matches!(decode(&mut b), Err(FrameError::Malformed { msg: "state", .. })));
}

fn hello() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        flags: 0,
        resource: "r0".into(),
        node: "alpha".into(),
        peer: "beta".into(),
        size: 1 << 30,
        block_size: 4096,
        gen_ids: GenIds { current: 1, bitmap: 0, history: [0; 4] },
        role: Role::Primary,
        disk: DiskState::UpToDate,
        nonce: [7; 32],
    }
}

#[test]
fn hello_names_must_be_utf8_and_non_empty() {
    let mut b = enc(&Message::Hello(Box::new(hello())));
    // The last name ("beta") is the last 4 bytes: make it invalid UTF-8
    // and fix the CRC so only the payload check can catch it.
    let n = b.len();
    b[n - 4] = 0xff;
    let mut b = raw_frame(msg_type::HELLO, 0, &b[FRAME_HEADER_LEN..]);
    match decode(&mut b) {
        Err(FrameError::Malformed { msg: "hello", detail }) => assert!(detail.contains("peer"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let mut h = hello();
    h.node = String::new();
    let mut out = BytesMut::from(&b"keep"[..]);
    assert!(matches!(encode(&Message::Hello(Box::new(h)), &mut out), Err(FrameError::Unencodable { .. })));
    assert_eq!(&out[..], b"keep", "a failed encode leaves the buffer as it was");
}

#[test]
fn oversized_data_cannot_be_encoded() {
    let m = Message::SyncData { offset: 0, data: Bytes::from(vec![0u8; MAX_DATA_LEN + 1]) };
    let mut out = BytesMut::new();
    assert!(matches!(encode(&m, &mut out), Err(FrameError::Unencodable { msg: "sync-data", .. })));
    assert!(out.is_empty());
    // The largest allowed write round-trips.
    let m = Message::Write { lsn: 1, offset: 0, fua: true, data: Bytes::from(vec![0xa5u8; MAX_DATA_LEN]) };
    let mut b = enc(&m);
    assert_eq!(decode(&mut b), Ok(Some(m)));
}

#[test]
fn long_messages_are_cut_at_a_char_boundary() {
    let long = "é".repeat(MAX_MESSAGE_LEN); // 2 bytes each
    let mut b = enc(&Message::Refuse { reason: RefuseReason::Other, message: long });
    match decode(&mut b) {
        Ok(Some(Message::Refuse { message, .. })) => {
            assert_eq!(message.len(), MAX_MESSAGE_LEN);
            assert!(message.chars().all(|c| c == 'é'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_reason_codes_read_as_other() {
    let mut p = Vec::new();
    p.extend_from_slice(&77u16.to_le_bytes());
    p.extend_from_slice(&2u16.to_le_bytes());
    p.extend_from_slice(b"hi");
    let mut b = raw_frame(msg_type::REFUSE, 0, &p);
    assert_eq!(decode(&mut b), Ok(Some(Message::Refuse { reason: RefuseReason::Other, message: "hi".into() })));
}

#[test]
fn every_type_code_has_a_name_and_a_decoder() {
    for t in 0..=u16::MAX {
        if let Some(name) = type_name(t) {
            // An empty payload is either a message or a Malformed naming it,
            // never the "no decoder" internal error.
            match decode(&mut raw_frame(t, 0, &[])) {
                Ok(Some(m)) => assert_eq!(m.msg_type(), t),
                Err(FrameError::Malformed { msg, detail }) => {
                    assert_eq!(msg, name);
                    assert!(!detail.contains("no decoder"), "{detail}");
                }
                other => panic!("type {t}: {other:?}"),
            }
        }
    }
}

#[test]
fn sync_info_layout_is_pinned() {
    let info = SyncInfo {
        role: Role::Primary,
        disk: DiskState::UpToDate,
        granularity: 4096,
        flags: sync_flags::DRY_RUN,
        gen_ids: GenIds { current: 0x11, bitmap: 0x22, history: [0x33, 0, 0, 0] },
        gen_created_ms: 7,
        local_lsn: 100,
        dirty_bytes: 8192,
        bitmap_base_lsn: 90,
        log_first_lsn: 50,
    };
    let b = enc(&Message::SyncInfo(Box::new(info)));
    let p = &b[FRAME_HEADER_LEN..];
    assert_eq!(p.len(), 100);
    assert_eq!(&p[..4], &[1, 1, 0, 0]);
    assert_eq!(&p[4..8], &4096u32.to_le_bytes());
    assert_eq!(&p[8..12], &1u32.to_le_bytes());
    assert_eq!(&p[12..20], &0x11u64.to_le_bytes());
    assert_eq!(&p[60..68], &7u64.to_le_bytes());
    assert_eq!(&p[68..76], &100u64.to_le_bytes());
    assert_eq!(&p[92..100], &50u64.to_le_bytes());
    assert!(info.dry_run() && !info.discard_my_data());
}

#[test]
fn resync_messages_avoid_the_verify_block() {
    for t in 0x40..=0x4f {
        let name = type_name(t);
        assert!(name.is_none_or(|n| n.starts_with("verify-")), "type {t:#x} is reserved for verify, got {name:?}");
    }
    assert_eq!(PROTOCOL_VERSION, 2);
}

#[test]
fn bad_resync_payloads_are_refused_with_the_field() {
    // SyncInfo with a granularity that is not a power of two.
    let mut m = enc(&Message::SyncInfo(Box::new(SyncInfo {
        role: Role::Secondary,
        disk: DiskState::Consistent,
        granularity: 4096,
        flags: 0,
        gen_ids: GenIds::default(),
        gen_created_ms: 0,
        local_lsn: 0,
        dirty_bytes: 0,
        bitmap_base_lsn: 0,
        log_first_lsn: 1,
    })));
    let mut payload = m.split_off(FRAME_HEADER_LEN).to_vec();
    payload[4..8].copy_from_slice(&4095u32.to_le_bytes());
    match decode(&mut raw_frame(msg_type::SYNC_INFO, 0, &payload)) {
        Err(FrameError::Malformed { msg: "sync-info", detail }) => assert!(detail.contains("granularity"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // Unknown SyncInfo flags.
    payload[4..8].copy_from_slice(&4096u32.to_le_bytes());
    payload[8..12].copy_from_slice(&0x100u32.to_le_bytes());
    match decode(&mut raw_frame(msg_type::SYNC_INFO, 0, &payload)) {
        Err(FrameError::Malformed { msg: "sync-info", detail }) => assert!(detail.contains("flags"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // BitmapChunk whose count disagrees with its payload.
    let mut p = Vec::new();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&3u32.to_le_bytes());
    p.extend_from_slice(&[0xff; 16]);
    match decode(&mut raw_frame(msg_type::BITMAP_CHUNK, 0, &p)) {
        Err(FrameError::Malformed { msg: "bitmap-chunk", detail }) => assert!(detail.contains("count"), "{detail}"),
        other => panic!("{other:?}"),
    }
    // A count over the maximum is refused before allocating.
    let mut p = Vec::new();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&mut raw_frame(msg_type::BITMAP_CHUNK, 0, &p)),
        Err(FrameError::Malformed { msg: "bitmap-chunk", .. })
    ));
    // SyncStart with an unknown kind.
    let mut p = vec![9, 0, 0, 0];
    p.extend_from_slice(&[0; 16]);
    match decode(&mut raw_frame(msg_type::SYNC_START, 0, &p)) {
        Err(FrameError::Malformed { msg: "sync-start", detail }) => assert!(detail.contains("kind"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

// --- Version 3: the witness link ------------------------------------------

fn arb_node() -> impl Strategy<Value = u8> {
    0u8..=7
}

fn arb_view() -> impl Strategy<Value = WitnessView> {
    (any::<u64>(), prop::option::of(arb_node()), any::<u8>()).prop_map(|(term, primary, uptodate)| WitnessView {
        term,
        primary,
        uptodate,
    })
}

fn arb_v3_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(seq, sent_ns, term)| Message::TermPing {
            seq,
            sent_ns,
            term
        }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::option::of((prop::option::of(arb_node()), any::<u8>()))
        )
            .prop_map(|(seq, echo_sent_ns, term, primary_ok, view)| Message::TermPong(TermPong {
                seq,
                echo_sent_ns,
                term,
                primary_ok,
                view
            })),
        (any::<u64>(), arb_node(), any::<bool>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(term, node, forced, gen_current, lsn_local, last_heard_primary_ms)| Message::Claim {
                term,
                node,
                forced,
                gen_current,
                lsn_local,
                last_heard_primary_ms
            }
        ),
        (any::<u64>(), arb_node()).prop_map(|(term, node)| Message::Solo { term, node }),
        (any::<u64>(), arb_node(), arb_node()).prop_map(|(term, node, peer)| Message::PeerUptodate {
            term,
            node,
            peer
        }),
        (any::<u64>(), arb_node()).prop_map(|(term, node)| Message::Release { term, node }),
        (128u16..=131, any::<u64>(), arb_view()).prop_map(|(request, request_term, view)| Message::Grant {
            request,
            request_term,
            view
        }),
        (128u16..=131, 1u8..=7, any::<u64>(), prop::option::of(arb_view()))
            .prop_map(|(request, reason, request_term, view)| Message::Refused { request, reason, request_term, view }),
        any::<u64>().prop_map(|higher_term| Message::TermRefuse { higher_term }),
    ]
}

proptest! {
    #[test]
    fn every_v3_message_round_trips(m in arb_v3_message()) {
        let mut b = enc(&m);
        prop_assert_eq!(b.len(), m.encoded_len());
        prop_assert_eq!(decode(&mut b).unwrap(), Some(m));
        prop_assert!(b.is_empty());
    }
}

#[test]
fn v3_layouts_are_pinned() {
    // Ping v3: 24 bytes; the 16-byte Ping stays version 2's.
    let b = enc(&Message::TermPing { seq: 1, sent_ns: 2, term: 3 });
    assert_eq!(b.len(), FRAME_HEADER_LEN + 24);
    assert_eq!(&b[FRAME_HEADER_LEN + 16..], &3u64.to_le_bytes());
    let pong = TermPong { seq: 1, echo_sent_ns: 2, term: 7, primary_ok: true, view: Some((Some(0), 0b11)) };
    let b = enc(&Message::TermPong(pong));
    assert_eq!(b.len(), FRAME_HEADER_LEN + 32);
    assert_eq!(&b[FRAME_HEADER_LEN + 24..FRAME_HEADER_LEN + 27], &[0b11, 0, 0b11]);
    let b = enc(&Message::Claim {
        term: 5,
        node: 1,
        forced: true,
        gen_current: 9,
        lsn_local: 10,
        last_heard_primary_ms: 11,
    });
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), 128);
    assert_eq!(&b[FRAME_HEADER_LEN + 8..FRAME_HEADER_LEN + 16], &[1, 1, 0, 0, 0, 0, 0, 0]);
    let b = enc(&Message::Refused { request: 128, reason: 6, request_term: 4, view: None });
    assert_eq!(&b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4], &[128, 0, 6, 0]);
    assert_eq!(b[FRAME_HEADER_LEN + 24], 0xff, "no primary without a view");
}

#[test]
fn bad_v3_payloads_are_refused_with_the_field() {
    let mut p = vec![0u8; 16];
    p[8] = 9;
    let e = decode(&mut raw_frame(msg_type::SOLO, 0, &p)).unwrap_err().to_string();
    assert!(e.contains("node 9 is not a node index"), "{e}");
    p[8] = 1;
    p[15] = 1;
    let e = decode(&mut raw_frame(msg_type::SOLO, 0, &p)).unwrap_err().to_string();
    assert!(e.contains("reserved"), "{e}");
    let mut pong = vec![0u8; 32];
    pong[24] = 0x80;
    let e = decode(&mut raw_frame(msg_type::PONG, 0, &pong)).unwrap_err().to_string();
    assert!(e.contains("unknown flags"), "{e}");
    pong[24] = 0;
    pong[26] = 1;
    let e = decode(&mut raw_frame(msg_type::PONG, 0, &pong)).unwrap_err().to_string();
    assert!(e.contains("without the VIEW flag"), "{e}");
}
