//! The NCCL transport where it can be checked: on a machine without CUDA or NCCL libraries,
//! construction reports `Unavailable` (and does not panic inside cudarc). With a GPU, a
//! one-rank communicator is created. Calls between ranks need two GPUs and are not tested here.

#![cfg(feature = "nccl")]

use myriad_transport::{NcclTransport, TransportError, nccl_unique_id};

#[test]
fn construction_reports_a_missing_gpu_or_library() {
    let id = match nccl_unique_id() {
        Ok(id) => id,
        Err(TransportError::Unavailable(message)) => {
            assert!(
                message.contains("no GPU / NCCL library found") || message.contains("no GPU found"),
                "{message}"
            );
            let err = NcclTransport::new(&[0; 128], 0, 1, 0, 1 << 20)
                .err()
                .expect("unavailable");
            assert!(matches!(err, TransportError::Unavailable(_)), "{err:?}");
            eprintln!("NCCL unavailable here, as expected: {message}");
            return;
        }
        Err(other) => panic!("unexpected error: {other:?}"),
    };
    let transport = NcclTransport::new(&id, 0, 1, 0, 1 << 20).expect("a one-rank communicator");
    assert_eq!((transport.rank(), transport.world_size()), (0, 1));
}
