//! A strict reader of the zip container torch.save writes, over bytes in
//! memory (the map of the file).
//!
//! torch writes a narrow dialect: stored members only, one central directory,
//! a ZIP64 end record, members back to back from byte 0 (each followed by its
//! data descriptor). Anything outside that dialect is refused rather than
//! interpreted, because zip readers disagree on it (torch's miniz takes the
//! first of two same-named members, Python's `zipfile` the last; scanners have
//! been fooled by local/central mismatches and encryption bits): a file that
//! means one thing here must mean the same thing to torch.

use std::collections::HashSet;

/// A member of the archive: where its bytes are in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Absolute offset of the first byte of data.
    pub data_start: u64,
    /// Bytes of data (stored, so compressed and uncompressed sizes agree).
    pub size: u64,
}

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD_LEN: u64 = 56;
const CENTRAL_LEN: u64 = 46;
const LOCAL_LEN: u64 = 30;
/// The longest data descriptor (signature, crc, two 8-byte sizes).
const MAX_DESCRIPTOR: u64 = 24;
/// General-purpose flag bits: 0 encrypted, 6 strong encryption, 13 the
/// central directory encrypted.
const ENCRYPTION_FLAGS: u16 = 1 | 1 << 6 | 1 << 13;
/// Flag bit 3: sizes and crc in a data descriptor after the data.
const DESCRIPTOR_FLAG: u16 = 1 << 3;

/// Little-endian fields read at absolute offsets, every access bounds-checked.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn slice(&self, at: u64, len: u64) -> Result<&[u8], String> {
        let end = at.checked_add(len).filter(|&e| e <= self.0.len() as u64);
        match end {
            Some(end) => Ok(&self.0[at as usize..end as usize]),
            None => Err(format!(
                "zip structure at byte {at} runs past the end of the file ({} bytes); truncated?",
                self.0.len()
            )),
        }
    }
    fn u16(&self, at: u64) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.slice(at, 2)?.try_into().expect("2"),
        ))
    }
    fn u32(&self, at: u64) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.slice(at, 4)?.try_into().expect("4"),
        ))
    }
    fn u64(&self, at: u64) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.slice(at, 8)?.try_into().expect("8"),
        ))
    }
}

/// The end records: where the central directory is and how many entries it has.
struct Directory {
    offset: u64,
    size: u64,
    entries: u64,
    /// Where the central directory must end (the ZIP64 end record, or the
    /// 32-bit one).
    end: u64,
}

/// Parse and check every member of the zip in `file`, in central-directory
/// order. `screen` sees each name before anything else about its member is
/// checked, so that a file of the wrong kind is named as such.
pub fn members(
    file: &[u8],
    screen: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<Member>, String> {
    let bytes = Bytes(file);
    let dir = directory(&bytes)?;
    let mut members = Vec::new();
    let mut spans = Vec::new(); // (local header offset, data end, flags)
    let mut names = HashSet::new();
    let mut at = dir.offset;
    while at < dir.end {
        if members.len() as u64 == dir.entries {
            return Err(format!(
                "the central directory holds more than the {} entries its end record counts",
                dir.entries
            ));
        }
        let (member, local, flags, next) = central_entry(&bytes, at, &dir, &screen)?;
        if !names.insert(member.name.clone()) {
            return Err(format!(
                "zip member {} appears twice (torch reads the first, Python's zipfile the last)",
                quoted(&member.name)
            ));
        }
        spans.push((local, member.data_start + member.size, flags));
        members.push(member);
        at = next;
    }
    if at != dir.end {
        return Err("the central directory's last entry runs past its end".into());
    }
    if members.len() as u64 != dir.entries {
        return Err(format!(
            "the zip end record counts {} entries, the central directory holds {}",
            dir.entries,
            members.len()
        ));
    }
    check_tiling(&mut spans, dir.offset)?;
    Ok(members)
}

/// Locate and cross-check the end-of-central-directory record(s).
fn directory(bytes: &Bytes) -> Result<Directory, String> {
    let len = bytes.0.len() as u64;
    if len < EOCD_LEN {
        return Err("too short to be a zip".into());
    }
    let eocd = len - EOCD_LEN;
    if bytes.u32(eocd)? != EOCD_SIG {
        // torch writes no zip comment, so the record ends the file; one
        // further back means a comment, where fake records hide.
        let from = eocd.saturating_sub(0xFFFF);
        let found = (from..eocd).any(|p| bytes.u32(p).is_ok_and(|s| s == EOCD_SIG));
        return Err(if found {
            "the zip has a comment after its end record; torch never writes one".into()
        } else {
            "no zip end-of-central-directory record; truncated?".into()
        });
    }
    // Another record whose comment would run exactly to the end of the file
    // is a second reading of the same bytes: readers that scan differently
    // would see different archives.
    let from = eocd.saturating_sub(0xFFFF);
    let hidden = (from..eocd).any(|p| {
        bytes.u32(p).is_ok_and(|s| s == EOCD_SIG)
            && bytes
                .u16(p + 20)
                .is_ok_and(|c| p + EOCD_LEN + u64::from(c) == len)
    });
    if hidden {
        return Err("two zip end records, one inside the other's comment".into());
    }
    let disk = bytes.u16(eocd + 4)?;
    let cd_disk = bytes.u16(eocd + 6)?;
    let disk_entries = bytes.u16(eocd + 8)?;
    let entries = bytes.u16(eocd + 10)?;
    let cd_size = bytes.u32(eocd + 12)?;
    let cd_offset = bytes.u32(eocd + 16)?;
    if bytes.u16(eocd + 20)? != 0 {
        return Err("the zip end record declares a comment that is not there".into());
    }
    let zip64 =
        eocd >= ZIP64_LOCATOR_LEN && bytes.u32(eocd - ZIP64_LOCATOR_LEN)? == ZIP64_LOCATOR_SIG;
    if !zip64 {
        if disk != 0 || cd_disk != 0 || disk_entries != entries {
            return Err("a multi-disk zip; torch writes one file".into());
        }
        if entries == u16::MAX || cd_size == u32::MAX || cd_offset == u32::MAX {
            return Err("the zip end record has ZIP64 markers but no ZIP64 record".into());
        }
        return checked(Directory {
            offset: cd_offset.into(),
            size: cd_size.into(),
            entries: entries.into(),
            end: eocd,
        });
    }
    let locator = eocd - ZIP64_LOCATOR_LEN;
    let record = bytes.u64(locator + 8)?;
    if bytes.u32(locator + 4)? != 0 || bytes.u32(locator + 16)? != 1 {
        return Err("a multi-disk zip; torch writes one file".into());
    }
    // The record must sit right before its locator: nothing hides between.
    if record.checked_add(ZIP64_EOCD_LEN) != Some(locator) {
        return Err("the ZIP64 end record is not where its locator points".into());
    }
    if bytes.u32(record)? != ZIP64_EOCD_SIG || bytes.u64(record + 4)? != ZIP64_EOCD_LEN - 12 {
        return Err("the ZIP64 end record is missing or malformed".into());
    }
    let z_disk = bytes.u32(record + 16)?;
    let z_cd_disk = bytes.u32(record + 20)?;
    let z_disk_entries = bytes.u64(record + 24)?;
    let z_entries = bytes.u64(record + 32)?;
    let z_cd_size = bytes.u64(record + 40)?;
    let z_cd_offset = bytes.u64(record + 48)?;
    let agrees16 = |short: u16, long: u64| short == u16::MAX || u64::from(short) == long;
    let agrees32 = |short: u32, long: u64| short == u32::MAX || u64::from(short) == long;
    if z_disk != 0 || z_cd_disk != 0 || z_disk_entries != z_entries {
        return Err("a multi-disk zip; torch writes one file".into());
    }
    if !(agrees16(disk, 0)
        && agrees16(cd_disk, 0)
        && agrees16(disk_entries, z_entries)
        && agrees16(entries, z_entries)
        && agrees32(cd_size, z_cd_size)
        && agrees32(cd_offset, z_cd_offset))
    {
        return Err("the zip's ZIP64 and 32-bit end records disagree".into());
    }
    checked(Directory {
        offset: z_cd_offset,
        size: z_cd_size,
        entries: z_entries,
        end: record,
    })
}

/// The central directory must end exactly where the end record begins.
fn checked(dir: Directory) -> Result<Directory, String> {
    if dir.offset.checked_add(dir.size) != Some(dir.end) {
        return Err(format!(
            "the zip end record puts the central directory at bytes {}..+{}, which does \
             not end where the end record begins ({}); truncated or junk appended?",
            dir.offset, dir.size, dir.end
        ));
    }
    Ok(dir)
}

/// One central-directory entry at `at`, checked against its local header.
/// Returns the member, its local header offset, its flags and where the next
/// entry starts.
fn central_entry(
    bytes: &Bytes,
    at: u64,
    dir: &Directory,
    screen: impl Fn(&str) -> Result<(), String>,
) -> Result<(Member, u64, u16, u64), String> {
    if bytes.u32(at)? != CENTRAL_SIG {
        return Err(format!("no central-directory entry at byte {at}"));
    }
    let flags = bytes.u16(at + 8)?;
    let method = bytes.u16(at + 10)?;
    let mut compressed = u64::from(bytes.u32(at + 20)?);
    let mut size = u64::from(bytes.u32(at + 24)?);
    let name_len = u64::from(bytes.u16(at + 28)?);
    let extra_len = u64::from(bytes.u16(at + 30)?);
    let comment_len = u64::from(bytes.u16(at + 32)?);
    let disk = bytes.u16(at + 34)?;
    let mut local = u64::from(bytes.u32(at + 42)?);
    let name_bytes = bytes.slice(at + CENTRAL_LEN, name_len)?;
    let name = member_name(name_bytes)?;
    screen(&name)?;
    let extra = bytes.slice(at + CENTRAL_LEN + name_len, extra_len)?;
    let next = at + CENTRAL_LEN + name_len + extra_len + comment_len;
    if next > dir.end {
        return Err(format!(
            "zip member {}'s central entry runs past the central directory",
            quoted(&name)
        ));
    }
    // ZIP64 extra field: the 8-byte values of the fields set to all ones.
    let mut wide = zip64_extra(extra, &name)?.into_iter();
    let mut widen = |field: &mut u64, short: u64| -> Result<(), String> {
        if *field == short {
            *field = wide.next().ok_or_else(|| {
                format!(
                    "zip member {} has ZIP64 markers but no ZIP64 sizes",
                    quoted(&name)
                )
            })?;
        }
        Ok(())
    };
    widen(&mut size, u32::MAX.into())?;
    widen(&mut compressed, u32::MAX.into())?;
    widen(&mut local, u32::MAX.into())?;
    if disk != 0 && !(disk == u16::MAX && wide.next() == Some(0)) {
        return Err("a multi-disk zip; torch writes one file".into());
    }
    if flags & ENCRYPTION_FLAGS != 0 {
        return Err(format!("zip member {} is encrypted", quoted(&name)));
    }
    if method != 0 {
        return Err(format!(
            "zip member {} is compressed (method {method}); torch.save stores members \
             uncompressed, and torch's mmap loader would read the compressed bytes",
            quoted(&name)
        ));
    }
    if compressed != size {
        return Err(format!(
            "zip member {} is stored but its compressed size {compressed} differs from \
             its size {size}",
            quoted(&name)
        ));
    }
    // The local header must say the same.
    if bytes.u32(local)? != LOCAL_SIG {
        return Err(format!(
            "zip member {} has no local header at byte {local}",
            quoted(&name)
        ));
    }
    let local_flags = bytes.u16(local + 6)?;
    let local_method = bytes.u16(local + 8)?;
    let local_compressed = bytes.u32(local + 18)?;
    let local_size = bytes.u32(local + 22)?;
    let local_name_len = u64::from(bytes.u16(local + 26)?);
    let local_extra_len = u64::from(bytes.u16(local + 28)?);
    if local_flags & ENCRYPTION_FLAGS != 0 {
        return Err(format!(
            "zip member {} is encrypted in its local header",
            quoted(&name)
        ));
    }
    if local_method != 0 {
        return Err(format!(
            "zip member {} is compressed in its local header (method {local_method})",
            quoted(&name)
        ));
    }
    if bytes.slice(local + LOCAL_LEN, local_name_len)? != name_bytes {
        return Err(format!(
            "zip member {}'s local header names another file",
            quoted(&name)
        ));
    }
    // torch leaves local sizes at 0 (they follow in a descriptor); when
    // present they must agree.
    let sizes_agree = |short: u32| short == 0 || short == u32::MAX || u64::from(short) == size;
    if !(sizes_agree(local_compressed) && sizes_agree(local_size)) {
        return Err(format!(
            "zip member {}'s local header gives another size",
            quoted(&name)
        ));
    }
    if size > 0 && local_size == 0 && local_flags & DESCRIPTOR_FLAG == 0 {
        return Err(format!(
            "zip member {}'s local header gives size 0 without a data descriptor",
            quoted(&name)
        ));
    }
    let data_start = local + LOCAL_LEN + local_name_len + local_extra_len;
    let data_end = data_start.checked_add(size);
    if data_end.is_none_or(|end| end > dir.offset) {
        return Err(format!(
            "zip member {} ({size} bytes from byte {data_start}) runs past the start of the \
             central directory; truncated?",
            quoted(&name)
        ));
    }
    let member = Member {
        name,
        data_start,
        size,
    };
    Ok((member, local, local_flags, next))
}

/// The 8-byte values of a ZIP64 extended-information field (id 1), if any.
fn zip64_extra(extra: &[u8], name: &str) -> Result<Vec<u64>, String> {
    let bad = || format!("zip member {} has a malformed extra field", quoted(name));
    let mut at = 0;
    let mut values = None;
    while at < extra.len() {
        let header = extra.get(at..at + 4).ok_or_else(bad)?;
        let id = u16::from_le_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_le_bytes([header[2], header[3]]));
        let body = extra.get(at + 4..at + 4 + len).ok_or_else(bad)?;
        if id == 1 {
            if values.is_some() || len % 8 != 0 && len % 8 != 4 {
                return Err(bad());
            }
            values = Some(
                body.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
                    .collect(),
            );
        }
        at += 4 + len;
    }
    Ok(values.unwrap_or_default())
}

/// Names must be plain relative paths: UTF-8, no NUL or other control
/// character, no `\`, leading `/`,
/// empty, `.` or `..` components.
fn member_name(raw: &[u8]) -> Result<String, String> {
    let name = std::str::from_utf8(raw).map_err(|_| {
        format!(
            "a zip member name is not UTF-8 ({})",
            quoted(&String::from_utf8_lossy(raw))
        )
    })?;
    let unsafe_name = name.contains(|c: char| c == '\\' || c.is_control())
        || name.starts_with('/')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if unsafe_name {
        return Err(format!(
            "zip member name {} is not a plain relative path",
            quoted(name)
        ));
    }
    Ok(name.to_owned())
}

/// Members lie back to back from byte 0 up to the central directory: no
/// prefix (self-extractor stubs, a second archive), no overlap, and between
/// two members nothing but a data descriptor.
fn check_tiling(spans: &mut [(u64, u64, u16)], cd_offset: u64) -> Result<(), String> {
    spans.sort_unstable();
    let mut expected = 0;
    let mut descriptor = false;
    for &(local, end, flags) in spans.iter() {
        check_gap(expected, local, descriptor)?;
        expected = end;
        descriptor = flags & DESCRIPTOR_FLAG != 0;
    }
    check_gap(expected, cd_offset, descriptor)
}

fn check_gap(end: u64, next: u64, descriptor: bool) -> Result<(), String> {
    if next < end {
        return Err(format!(
            "zip members overlap (byte {next} belongs to two of them)"
        ));
    }
    let limit = if descriptor { MAX_DESCRIPTOR } else { 0 };
    if next - end > limit {
        return Err(if end == 0 {
            format!("{next} bytes before the first zip member (a self-extractor or another file?)")
        } else {
            format!(
                "{} unlisted bytes between zip members at byte {end}",
                next - end
            )
        });
    }
    Ok(())
}

/// A name for a message: quoted, escaped, and cut when very long.
pub fn quoted(name: &str) -> String {
    const MAX: usize = 80;
    match name.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &name[..cut]),
        None => format!("{name:?}"),
    }
}
