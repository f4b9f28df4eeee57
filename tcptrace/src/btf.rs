//! Just enough of a BTF reader to find struct member offsets in the running
//! kernel (aya's Rust programs have no CO-RE relocations for field reads).
use anyhow::{bail, Context as _, Result};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// size for structs, referenced type for modifiers
    size_or_type: u32,
    members: Vec<Member>,
}

struct Member {
    name_off: u32,
    ty: u32,
    bit_offset: u32,
}

pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is void.
    types: Vec<Type>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| {
            format!("cannot read {path}: this kernel has no BTF (needs CONFIG_DEBUG_INFO_BTF=y)")
        })?;
        Self::parse(&data).with_context(|| format!("cannot parse {path}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u16_at = |o: usize| -> Result<u16> {
            Ok(u16::from_le_bytes(
                data.get(o..o + 2).context("truncated")?.try_into()?,
            ))
        };
        let u32_at = |o: usize| -> Result<u32> {
            Ok(u32::from_le_bytes(
                data.get(o..o + 4).context("truncated")?.try_into()?,
            ))
        };
        if u16_at(0)? != BTF_MAGIC {
            bail!("not BTF (bad magic, or big-endian)");
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = hdr_len + u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = hdr_len + u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data
            .get(str_off..str_off + str_len)
            .context("string section out of range")?
            .to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: vec![],
        }];
        let mut o = type_off;
        let end = type_off + type_len;
        while o < end {
            let name_off = u32_at(o)?;
            let info = u32_at(o + 4)?;
            let size_or_type = u32_at(o + 8)?;
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => o += 4,
                KIND_ARRAY => o += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        members.push(Member {
                            name_off: u32_at(o)?,
                            ty: u32_at(o + 4)?,
                            bit_offset: u32_at(o + 8)?,
                        });
                        o += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => o += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => o += 12 * vlen,
                _ => {}
            }
            types.push(Type {
                name_off,
                kind,
                kind_flag,
                size_or_type,
                members,
            });
        }
        Ok(Btf { strings, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| {
                t.kind == KIND_STRUCT
                    && self.name(t.name_off) == name.as_bytes()
                    && !t.members.is_empty()
            })
            .map(|i| i as u32)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset and type of `member` in the struct/union `id`, looking
    /// through anonymous members as C does.
    fn member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &t.members {
            let bits = if t.kind_flag {
                m.bit_offset & 0x00ff_ffff
            } else {
                m.bit_offset
            };
            let name = self.name(m.name_off);
            if name == member.as_bytes() {
                return Some((bits / 8, m.ty));
            }
            if name.is_empty() {
                if let Some((off, ty)) = self.member(m.ty, member) {
                    return Some((bits / 8 + off, ty));
                }
            }
        }
        None
    }

    /// Offset of `a.b.c` inside `struct s`.
    pub fn offset_of(&self, s: &str, path: &[&str]) -> Result<u32> {
        let mut id = self
            .struct_id(s)
            .with_context(|| format!("struct {s} not in kernel BTF"))?;
        let mut total = 0;
        for m in path {
            let (off, ty) = self
                .member(id, m)
                .with_context(|| format!("no member {m} on the way to {s}.{}", path.join(".")))?;
            total += off;
            id = ty;
        }
        Ok(total)
    }
}

/// Offsets the kernel side needs to read a socket's network namespace inode:
/// `sk->__sk_common.skc_net.net` then `net->ns.inum`.
pub fn netns_offsets(btf: &Btf) -> Result<(u32, u32)> {
    let sk_net = btf.offset_of("sock", &["__sk_common", "skc_net", "net"])?;
    let ns_inum = btf.offset_of("net", &["ns", "inum"])?;
    Ok((sk_net, ns_inum))
}

/// Offsets from a task to the `struct socket` behind one of its
/// descriptors, for the syscall-exit accept hook: (task.files,
/// files_struct.fdt, fdtable.fd, file.private_data).
pub fn accept_offsets(btf: &Btf) -> Result<[u32; 4]> {
    Ok([
        btf.offset_of("task_struct", &["files"])?,
        btf.offset_of("files_struct", &["fdt"])?,
        btf.offset_of("fdtable", &["fd"])?,
        btf.offset_of("file", &["private_data"])?,
    ])
}

/// `socket.sk`: where both accept hooks find the accepted socket.
pub fn socket_sk_offset(btf: &Btf) -> Result<u32> {
    btf.offset_of("socket", &["sk"])
}

/// Offsets of a TCP socket's 64-bit byte counters from its `struct sock`
/// (the start of its `tcp_sock`): (bytes_acked, bytes_received).
pub fn byte_counter_offsets(btf: &Btf) -> Result<(u32, u32)> {
    Ok((
        btf.offset_of("tcp_sock", &["bytes_acked"])?,
        btf.offset_of("tcp_sock", &["bytes_received"])?,
    ))
}

/// What the sock_ops program reads beyond its context: from the `struct
/// sock *`, `inet_sock.inet_saddr` and `inet_sock.inet_sport`; from the
/// current task, `task_struct.tgid` and `task_struct.comm`.
pub fn sock_ops_offsets(btf: &Btf) -> Result<[u32; 4]> {
    Ok([
        btf.offset_of("inet_sock", &["inet_saddr"])?,
        btf.offset_of("inet_sock", &["inet_sport"])?,
        btf.offset_of("task_struct", &["tgid"])?,
        btf.offset_of("task_struct", &["comm"])?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF, which every kernel tcptrace supports has.
    #[test]
    fn finds_socket_netns_offsets_on_this_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux here; nothing to check");
            return;
        };
        let (sk_net, inum) = netns_offsets(&btf).unwrap();
        // skc_net has sat at 48 in struct sock_common on 64-bit since 4.x.
        assert_eq!(sk_net, 48);
        assert!(inum > 0 && inum < 4096, "inum offset {inum}");
        let acc = accept_offsets(&btf).unwrap();
        assert!(acc[0] > 0 && acc[3] > 0, "{acc:?}");
        assert!(socket_sk_offset(&btf).unwrap() > 0);
        // Past struct sock (over 700 bytes), 8-byte aligned.
        let (acked, received) = byte_counter_offsets(&btf).unwrap();
        for off in [acked, received] {
            assert!(off > 700 && off % 8 == 0, "counter offset {off}");
        }
        // Past struct sock, in inet_sock and tcp_sock.
        let [saddr, sport, tgid, comm] = sock_ops_offsets(&btf).unwrap();
        assert!(saddr > 700 && sport > saddr, "{saddr} {sport}");
        assert!(tgid > 0 && comm > tgid, "{tgid} {comm}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(b"nope").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
    }
}
