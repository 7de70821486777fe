//! dma-engine's programming model (SPEC 6.1), written once for both sides: the BAR0
//! register map and op codes the device decodes, and [`DmaEngineRegs`], the driver-side
//! helper a VMM or a test programs the device with over any transport that carries 8-byte
//! register reads and writes ([`RegisterAccess`]).

/// PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1b36;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x10d1;
/// Bytes of BAR0.
pub const BAR0_SIZE: u64 = 4096;
/// "DMALOG01" as a little-endian u64.
pub const MAGIC: u64 = 0x3130_474F_4C41_4D44;

/// Register offsets in BAR0.
pub mod reg {
    /// RO magic.
    pub const MAGIC: u64 = 0x000;
    /// Destination IOVA.
    pub const DST: u64 = 0x008;
    /// Source IOVA.
    pub const SRC: u64 = 0x010;
    /// Bytes.
    pub const LEN: u64 = 0x018;
    /// Fill seed.
    pub const PATTERN: u64 = 0x020;
    /// 1 FILL, 2 COPY, 3 READ.
    pub const OP: u64 = 0x028;
    /// WO: run OP.
    pub const DOORBELL: u64 = 0x030;
    /// RO: 0 or the errno of the last op.
    pub const STATUS: u64 = 0x038;
    /// RO: FNV-1a 64 of the bytes READ read.
    pub const RESULT: u64 = 0x040;
    /// RO: total bytes written by DMA.
    pub const BYTES_WRITTEN: u64 = 0x048;
    /// RO: doorbell ops completed.
    pub const OPS_DONE: u64 = 0x050;
    /// Bit 0: raise INTx after each doorbell op.
    pub const IRQ_CTRL: u64 = 0x058;
    /// Workload IOVA base.
    pub const WL_BASE: u64 = 0x080;
    /// Workload working set, bytes.
    pub const WL_SPAN: u64 = 0x088;
    /// Workload bytes per write.
    pub const WL_SIZE: u64 = 0x090;
    /// Workload bytes per second (0: as fast as possible).
    pub const WL_RATE: u64 = 0x098;
    /// Workload seed.
    pub const WL_SEED: u64 = 0x0A0;
    /// Bit 0: run the workload.
    pub const WL_CTRL: u64 = 0x0A8;
    /// RO: workload writes done.
    pub const WL_WRITES: u64 = 0x0B0;
}

/// OP values.
pub mod op {
    /// Write LEN bytes at DST: word k = PATTERN + k.
    pub const FILL: u64 = 1;
    /// Copy LEN bytes from SRC to DST.
    pub const COPY: u64 = 2;
    /// Read LEN bytes at SRC into RESULT (FNV-1a 64).
    pub const READ: u64 = 3;
}
/// The number of 8-byte registers, the last one [`reg::WL_WRITES`].
pub(super) const NUM_REGS: usize = (reg::WL_WRITES / 8 + 1) as usize;

/// Aligned 8-byte access to one region of a device (dma-engine's BAR0), as a driver does
/// it over its transport (vfio-user REGION_READ/WRITE, a VFIO device fd, in process).
pub trait RegisterAccess {
    /// The transport's error.
    type Error;
    /// Reads the 8-byte little-endian register at byte `offset`.
    fn read_register(&mut self, offset: u64) -> Result<u64, Self::Error>;
    /// Writes the 8-byte little-endian register at byte `offset`.
    fn write_register(&mut self, offset: u64, value: u64) -> Result<(), Self::Error>;
}

/// The workload dma-engine runs in the background while RUNNING (the `WL_*` registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// First IOVA of the working set.
    pub base_iova: u64,
    /// Bytes of the working set.
    pub span_bytes: u64,
    /// Bytes of each write (a whole page: 4096).
    pub write_bytes: u64,
    /// Bytes per second (0: as fast as the device can).
    pub rate_bytes_per_sec: u64,
    /// Seed of the write sequence ([`super::workload_write`]).
    pub seed: u64,
}

/// A dma-engine driven through its registers: "run this op", "start / stop / re-rate the
/// workload" turned into register writes in the order the device expects (every parameter
/// before the control bit that acts on them).
#[derive(Debug)]
pub struct DmaEngineRegs<A> {
    bar0: A,
}

impl<A: RegisterAccess> DmaEngineRegs<A> {
    /// The device whose BAR0 `bar0` reaches.
    pub fn new(bar0: A) -> Self {
        DmaEngineRegs { bar0 }
    }

    /// The MAGIC register ([`MAGIC`] on a dma-engine).
    pub fn magic(&mut self) -> Result<u64, A::Error> {
        self.bar0.read_register(reg::MAGIC)
    }

    /// Runs op `op` ([`op::FILL`], [`op::COPY`], [`op::READ`], or any value, which the
    /// device refuses with EINVAL) over `len_bytes` and returns STATUS: 0 or an errno.
    pub fn run_op(
        &mut self,
        op: u64,
        dst_iova: u64,
        src_iova: u64,
        len_bytes: u64,
        pattern: u64,
    ) -> Result<u64, A::Error> {
        for (offset, value) in [
            (reg::DST, dst_iova),
            (reg::SRC, src_iova),
            (reg::LEN, len_bytes),
            (reg::PATTERN, pattern),
            (reg::OP, op),
        ] {
            self.bar0.write_register(offset, value)?;
        }
        self.bar0.write_register(reg::DOORBELL, 1)?;
        self.bar0.read_register(reg::STATUS)
    }

    /// Programs the workload and starts it (WL_CTRL last).
    pub fn start_workload(&mut self, config: &WorkloadConfig) -> Result<(), A::Error> {
        for (offset, value) in [
            (reg::WL_BASE, config.base_iova),
            (reg::WL_SPAN, config.span_bytes),
            (reg::WL_SIZE, config.write_bytes),
            (reg::WL_RATE, config.rate_bytes_per_sec),
            (reg::WL_SEED, config.seed),
            (reg::WL_CTRL, 1),
        ] {
            self.bar0.write_register(offset, value)?;
        }
        Ok(())
    }

    /// Stops the workload (it finishes the write in flight).
    pub fn stop_workload(&mut self) -> Result<(), A::Error> {
        self.bar0.write_register(reg::WL_CTRL, 0)
    }

    /// Sets the workload's rate, bytes per second (0: unlimited), taking effect at once.
    pub fn set_workload_rate(&mut self, rate_bytes_per_sec: u64) -> Result<(), A::Error> {
        self.bar0.write_register(reg::WL_RATE, rate_bytes_per_sec)
    }

    /// The workload's writes so far.
    pub fn workload_writes(&mut self) -> Result<u64, A::Error> {
        self.bar0.read_register(reg::WL_WRITES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access; reads return the offset.
    #[derive(Default)]
    struct Recorder(Vec<(char, u64, u64)>);

    impl RegisterAccess for Recorder {
        type Error = ();
        fn read_register(&mut self, offset: u64) -> Result<u64, ()> {
            self.0.push(('r', offset, 0));
            Ok(offset)
        }
        fn write_register(&mut self, offset: u64, value: u64) -> Result<(), ()> {
            self.0.push(('w', offset, value));
            Ok(())
        }
    }

    #[test]
    fn an_op_writes_its_parameters_then_rings_and_reads_status() {
        let mut regs = DmaEngineRegs::new(Recorder::default());
        assert_eq!(regs.run_op(op::COPY, 1, 2, 3, 4), Ok(reg::STATUS));
        let w = |offset, value| ('w', offset, value);
        assert_eq!(
            regs.bar0.0,
            [
                w(reg::DST, 1),
                w(reg::SRC, 2),
                w(reg::LEN, 3),
                w(reg::PATTERN, 4),
                w(reg::OP, op::COPY),
                w(reg::DOORBELL, 1),
                ('r', reg::STATUS, 0),
            ]
        );
    }

    #[test]
    fn the_workload_starts_after_its_parameters() {
        let mut regs = DmaEngineRegs::new(Recorder::default());
        let config = WorkloadConfig {
            base_iova: 0x1000,
            span_bytes: 0x2000,
            write_bytes: 4096,
            rate_bytes_per_sec: 5,
            seed: 6,
        };
        regs.start_workload(&config).unwrap();
        regs.set_workload_rate(7).unwrap();
        regs.stop_workload().unwrap();
        let offsets: Vec<(u64, u64)> = regs.bar0.0.iter().map(|&(_, o, v)| (o, v)).collect();
        assert_eq!(
            offsets,
            [
                (reg::WL_BASE, 0x1000),
                (reg::WL_SPAN, 0x2000),
                (reg::WL_SIZE, 4096),
                (reg::WL_RATE, 5),
                (reg::WL_SEED, 6),
                (reg::WL_CTRL, 1),
                (reg::WL_RATE, 7),
                (reg::WL_CTRL, 0),
            ]
        );
        assert_eq!(regs.workload_writes(), Ok(reg::WL_WRITES));
    }
}
