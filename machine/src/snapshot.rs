//! The machine's state outside RAM as checkpoints hold it: capturing, restoring, digesting and comparing
//! it (in canonical form), and naming what differs.

use crate::cpu::CpuState;
use crate::smp::SmpState;
use crate::vcpu::queued_in;
use crate::vm::{Clock, Machine, MachineError};
use devices::Devices;
use memory::PAGE_SIZE;
use serde::{Deserialize, Serialize};

/// Machine state that is not guest RAM: serialized into checkpoints and hashed into digests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct MachineState {
    /// The position: the icount in step traces, the landmark count in landmark traces.
    pub(crate) icount: u64,
    pub(crate) halted: bool,
    pub(crate) cpu: CpuState,
    pub(crate) devices: Devices,
}

/// The whole state outside RAM: the uniprocessor part (with vCPU 0), and on a machine with several
/// vCPUs the rest. Its blob is the uniprocessor part's, followed by the rest's when there is one, so a
/// uniprocessor checkpoint is byte for byte what it was before machines had several vCPUs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FullState {
    pub(crate) uni: MachineState,
    pub(crate) smp: Option<SmpState>,
}

impl FullState {
    fn encode(&self) -> Result<Vec<u8>, MachineError> {
        let mut blob = postcard::to_allocvec(&self.uni).map_err(MachineError::BadState)?;
        if let Some(smp) = &self.smp {
            blob.extend(postcard::to_allocvec(smp).map_err(MachineError::BadState)?);
        }
        Ok(blob)
    }

    fn decode(blob: &[u8]) -> Result<FullState, MachineError> {
        let (uni, rest) = postcard::take_from_bytes(blob).map_err(MachineError::BadState)?;
        let smp = if rest.is_empty() {
            None
        } else {
            Some(postcard::from_bytes(rest).map_err(MachineError::BadState)?)
        };
        Ok(FullState { uni, smp })
    }
}

/// A checkpoint of the machine as the trace stores it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Position: instruction count (step clock) or landmark count (landmark clock).
    pub icount: u64,
    /// Guest RIP.
    pub rip: u64,
    /// Serialized CPU and device state.
    pub state: Vec<u8>,
    /// (page frame, contents): every non-zero page if full, else pages changed since the previous snapshot.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// The page frames written since the previous snapshot (by the guest or a device's DMA): `pages`'
    /// frames when incremental; what a search may skip by when full.
    pub written: Vec<u64>,
    /// Digest of the whole machine (see `Machine::digest`).
    pub digest: [u8; 32],
}

impl Machine {
    pub(crate) fn state(&self) -> Result<FullState, MachineError> {
        let first = self.vcpu(0);
        Ok(FullState {
            uni: MachineState {
                icount: self.position(),
                halted: first.halted,
                cpu: CpuState::capture(&first.fd, &self.xsave_layout)?,
                devices: self.devices.clone(),
            },
            smp: self.smp_state()?,
        })
    }

    /// The serialized CPU and device state (a checkpoint without memory).
    pub fn state_blob(&self) -> Result<Vec<u8>, MachineError> {
        self.state()?.encode()
    }

    /// Takes a checkpoint: `full` holds every non-zero page, otherwise the pages written since the previous one.
    pub fn snapshot(&mut self, full: bool) -> Result<Snapshot, MachineError> {
        let state = self.state_blob()?;
        let dirty = self.take_dirty_pages()?;
        self.dirty_since_mark.fill(0);
        self.dirty_since_waypoint.fill(0);
        if self.cold_checkpoints() {
            self.reset_mmu()?;
        }
        let pages = if full {
            (0..self.mem.pages() as u64)
                .filter(|&pfn| self.mem.page(pfn as usize).iter().any(|&b| b != 0))
                .collect()
        } else {
            dirty.clone()
        };
        let pages = pages
            .into_iter()
            .map(|pfn| (pfn, self.mem.page(pfn as usize).to_vec()))
            .collect();
        let digest = self.digest_of(&state)?;
        Ok(Snapshot {
            icount: self.position(),
            rip: self.cpu.regs.rip,
            state,
            pages,
            written: dirty,
            digest,
        })
    }

    /// The digest of the machine as it is now (as [`Snapshot::digest`] would be): bytes 0-15 cover CPU,
    /// device state and RAM, bytes 16-31 CPU and device state only.
    pub fn digest(&mut self) -> Result<[u8; 32], MachineError> {
        let state = self.state_blob()?;
        self.digest_of(&state)
    }

    /// Decodes a state blob, with its XSAVE region in canonical form (traces recorded before capture
    /// canonicalized it hold the raw form).
    pub(crate) fn canonical_state(&self, blob: &[u8]) -> Result<FullState, MachineError> {
        let mut state = FullState::decode(blob)?;
        self.xsave_layout.canonicalize(&mut state.uni.cpu.xsave);
        for other in state.smp.iter_mut().flat_map(|smp| smp.others.iter_mut()) {
            self.xsave_layout.canonicalize(&mut other.cpu.xsave);
        }
        Ok(state)
    }

    /// Whether the machine now holds the state a checkpoint recorded as (`recorded`, `digest`) even
    /// though [`Machine::digest`] differs from `digest`: RAM is identical (the recorded digest over the
    /// recorded state blob and this RAM matches) and the CPU and device state are equal once both are
    /// canonical. So a checkpoint whose XSAVE region was saved in another (equivalent) form, as
    /// traces from before canonicalization hold, is no divergence.
    pub fn equivalent_to(
        &mut self,
        recorded: &[u8],
        digest: &[u8; 32],
    ) -> Result<bool, MachineError> {
        if self.digest_of(recorded)?[..16] != digest[..16] {
            return Ok(false);
        }
        self.state_matches(recorded)
    }

    /// Decodes a state blob as restoring it would make it: canonical, and with this machine's disk
    /// images attached (checkpoints do not hold them), so that it equals [`Machine::state`] when the
    /// machine is in that state.
    pub(crate) fn recorded_state(&self, blob: &[u8]) -> Result<FullState, MachineError> {
        let mut state = self.canonical_state(blob)?;
        state.uni.devices = self
            .devices
            .restored(state.uni.devices)
            .map_err(MachineError::BadDeviceState)?;
        Ok(state)
    }

    /// Whether the CPU and device state now is the one `recorded` holds (a blob made by
    /// [`Machine::state_blob`], as a checkpoint stores it), once both are canonical: what a replay that
    /// reached a checkpoint's digest checks the state the checkpoint stores against.
    pub fn state_matches(&self, recorded: &[u8]) -> Result<bool, MachineError> {
        Ok(self.recorded_state(recorded)? == self.state()?)
    }

    /// The digest a checkpoint storing the state blob `state` and the RAM the machine holds now
    /// has (see [`Machine::digest`]): its recorded digest, if what it stores is what was digested.
    pub fn digest_with_state(&mut self, state: &[u8]) -> Result<[u8; 32], MachineError> {
        self.digest_of(state)
    }

    /// What differs between the CPU and device state now and `recorded` (a blob made by
    /// [`Machine::state_blob`], as a checkpoint holds it), one line per field, at most `limit` lines:
    /// what a divergence report names.
    pub fn state_differences(
        &self,
        recorded: &[u8],
        limit: usize,
    ) -> Result<Vec<String>, MachineError> {
        let FullState {
            uni: then,
            smp: then_smp,
        } = self.canonical_state(recorded)?;
        let FullState {
            uni: now,
            smp: now_smp,
        } = self.state()?;
        let mut out = Vec::new();
        if now.icount != then.icount {
            out.push(format!(
                "icount is {}, recorded {}",
                now.icount, then.icount
            ));
        }
        if now.halted != then.halted {
            out.push(format!(
                "halted is {}, recorded {}",
                now.halted, then.halted
            ));
        }
        out.extend(now.cpu.differences(&then.cpu, &self.xsave_layout));
        if now.devices != then.devices {
            // Devices are plain serde data: compare them as JSON trees to name the field.
            let to_json = |d: &Devices| serde_json::to_value(d).unwrap_or_default();
            json_differences(
                "devices",
                &to_json(&now.devices),
                &to_json(&then.devices),
                &mut out,
            );
        }
        if let (Some(now), Some(then)) = (&now_smp, &then_smp) {
            for (i, (a, b)) in now.others.iter().zip(&then.others).enumerate() {
                let cpu = i + 1;
                if a.halted != b.halted {
                    out.push(format!(
                        "vCPU {cpu}: halted is {}, recorded {}",
                        a.halted, b.halted
                    ));
                }
                let differences = a.cpu.differences(&b.cpu, &self.xsave_layout);
                out.extend(differences.into_iter().map(|d| format!("vCPU {cpu}: {d}")));
            }
            let to_json = |s: &SmpState| {
                serde_json::json!({
                    "running_cpu": s.current,
                    "activity": s.activity,
                    "lapics": s.lapics,
                    "ioapic": s.ioapic,
                })
            };
            json_differences("smp", &to_json(now), &to_json(then), &mut out);
        } else if now_smp.is_some() != then_smp.is_some() {
            out.push("the checkpoint is of a machine with another number of vCPUs".into());
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Overwrites one page of RAM with `data` (None: zeroes), without marking it dirty: restoring is how the
    /// baseline is set, not a change to it.
    pub fn restore_page(&mut self, pfn: u64, data: Option<&[u8]>) -> Result<(), MachineError> {
        const ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let n = self.mem.pages();
        let idx = usize::try_from(pfn)
            .ok()
            .filter(|&p| p < n)
            .ok_or(MachineError::BadPage { pfn, pages: n })?;
        self.stale_hashes[idx / 64] |= 1 << (idx % 64);
        Ok(self.mem.set_page(idx, data.unwrap_or(&ZERO))?)
    }

    /// Restores CPU and device state from a blob made by [`Machine::state_blob`]; memory is left alone.
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), MachineError> {
        let FullState { uni: st, smp } = FullState::decode(state)?;
        if smp.is_some() != self.is_multiprocessor() {
            return Err(MachineError::BadDeviceState(format!(
                "the checkpoint is of a machine with {} vCPUs, this one has {}",
                smp.as_ref().map_or(1, |s| s.lapics.len()),
                self.cpus()
            )));
        }
        let devices = self
            .devices
            .restored(st.devices)
            .map_err(MachineError::BadDeviceState)?;
        // The uniprocessor part holds vCPU 0.
        self.switch_to(0)?;
        st.cpu.restore(&self.cpu.fd)?;
        match self.positions {
            Clock::Step => self.icount = st.icount,
            Clock::Landmark => self.landmarks = st.icount,
        }
        self.cpu.halted = st.halted;
        // An event the state holds queued is delivered at the next entry, as when it was queued.
        self.cpu.queued = queued_in(&st.cpu);
        self.devices = devices;
        self.cpu.regs = st.cpu.regs;
        self.cpu.sregs = st.cpu.sregs;
        self.cpu.shadow = st.cpu.events.interrupt.shadow != 0;
        self.cpu.kvm_event = false;
        self.cpu.stale_shadow = false;
        self.output.clear();
        if let Some(smp) = &smp {
            self.restore_smp_state(smp)?;
        }
        Ok(())
    }

    /// Restores a checkpoint: the state blob and the complete set of non-zero pages (absent pages are zero).
    pub fn restore<'a>(
        &mut self,
        state: &[u8],
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), MachineError> {
        self.mem.clear();
        self.stale_hashes.fill(u64::MAX);
        for (pfn, data) in pages {
            self.restore_page(pfn, Some(data))?;
        }
        self.restore_state(state)?;
        self.take_dirty_pages()?;
        self.dirty_since_mark.fill(0);
        self.reset_mmu()?;
        Ok(())
    }
}

/// Appends "PATH is A, recorded B" for every leaf where two JSON trees differ.
fn json_differences(
    path: &str,
    now: &serde_json::Value,
    then: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (now, then) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, va) in a {
                let vb = b.get(key).unwrap_or(&Value::Null);
                json_differences(&format!("{path}.{key}"), va, vb, out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                json_differences(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if now != then => {
            let short = |v: &Value| {
                let s = v.to_string();
                if s.len() > 80 {
                    format!("{}...", &s[..s.floor_char_boundary(80)])
                } else {
                    s
                }
            };
            out.push(format!(
                "{path} is {}, recorded {}",
                short(now),
                short(then)
            ));
        }
        _ => {}
    }
}
