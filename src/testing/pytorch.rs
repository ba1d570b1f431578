//! Writes PyTorch checkpoints (`torch.save` of a state dict: a zip archive with the pickled
//! dict in `archive/data.pkl` and one raw little-endian storage per tensor in
//! `archive/data/N`) without Python, from candle tensors, for tests of `.bin` loading.

use std::{
    io::{Cursor, Write},
    path::Path,
};

use candle_core::{DType, Tensor};

/// Pickle opcodes (protocol 2) this writer uses.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const BINPERSID: u8 = b'Q';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.push(op::BINUNICODE);
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn int(out: &mut Vec<u8>, n: usize) {
    out.push(op::BININT);
    out.extend((n as i32).to_le_bytes());
}

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(op::GLOBAL);
    out.extend(format!("{module}\n{name}\n").as_bytes());
}

fn tuple(out: &mut Vec<u8>, items: &[usize]) {
    out.push(op::MARK);
    for &i in items {
        int(out, i);
    }
    out.push(op::TUPLE);
}

/// The bytes of `torch.save(state_dict)` for these tensors (f32, f16 or bf16, contiguous).
pub fn checkpoint(tensors: &[(String, Tensor)]) -> candle_core::Result<Vec<u8>> {
    let mut pkl = vec![op::PROTO, 2];
    global(&mut pkl, "collections", "OrderedDict");
    pkl.extend([op::EMPTY_TUPLE, op::REDUCE, op::MARK]);
    let mut storages = Vec::new();
    for (key, (name, tensor)) in tensors.iter().enumerate() {
        let storage = match tensor.dtype() {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            other => candle_core::bail!("no PyTorch storage written for {other:?}"),
        };
        let dims = tensor.dims().to_vec();
        let mut stride = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * dims[i + 1];
        }
        string(&mut pkl, name);
        global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.push(op::MARK);
        // The storage: persistent id ("storage", type, key, location, numel).
        pkl.push(op::MARK);
        string(&mut pkl, "storage");
        global(&mut pkl, "torch", storage);
        string(&mut pkl, &key.to_string());
        string(&mut pkl, "cpu");
        int(&mut pkl, tensor.elem_count());
        pkl.extend([op::TUPLE, op::BINPERSID]);
        int(&mut pkl, 0);
        tuple(&mut pkl, &dims);
        tuple(&mut pkl, &stride);
        pkl.push(op::NEWFALSE);
        global(&mut pkl, "collections", "OrderedDict");
        pkl.extend([op::EMPTY_TUPLE, op::REDUCE, op::TUPLE, op::REDUCE]);
        let mut bytes = Vec::new();
        tensor.flatten_all()?.write_bytes(&mut bytes)?;
        storages.push(bytes);
    }
    pkl.extend([op::SETITEMS, op::STOP]);

    let mut buf = Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut put = |name: &str, bytes: &[u8]| -> candle_core::Result<()> {
        zip.start_file(name, options)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        zip.write_all(bytes)?;
        Ok(())
    };
    put("archive/data.pkl", &pkl)?;
    for (key, bytes) in storages.iter().enumerate() {
        put(&format!("archive/data/{key}"), bytes)?;
    }
    put("archive/version", b"3\n")?;
    zip.finish()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(buf.into_inner())
}

/// Replaces `dir`'s `model.safetensors` with the same tensors as `pytorch_model.bin`.
pub fn safetensors_to_pytorch(dir: &Path) -> candle_core::Result<()> {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(dir.join("pytorch_model.bin"), checkpoint(&tensors)?)?;
    std::fs::remove_file(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(0f32, 12., &candle_core::Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let bytes = checkpoint(&[("a.weight".into(), a.clone()), ("b".into(), b.clone())]).unwrap();
        let path = dir.path().join("pytorch_model.bin");
        std::fs::write(&path, bytes).unwrap();
        let mut read = candle_core::pickle::read_all(&path).unwrap();
        read.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].0, "a.weight");
        assert_eq!(
            read[0].1.to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(read[1].1.to_vec1::<f32>().unwrap(), [1.5, -2.0]);
    }
}
