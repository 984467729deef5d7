# Exports the environment of the x64 MSVC toolset (what the "x64 Native Tools Command Prompt" sets)
# to the next workflow steps, and makes CMake use Ninja with it: the Visual Studio generator needs
# CUDA's Visual Studio integration, Ninja only needs cl.exe and nvcc on PATH.
# -VcvarsVer picks the toolset (default 14.44, the newest MSVC that CUDA 12.4 - 13.1 accept: _MSC_VER
# < 1950); vcvars fails, and with it the job, when the runner image does not have it.
param([string]$VcvarsVer = "14.44")
$ErrorActionPreference = "Stop"
$vswhere = "${env:ProgramFiles(x86)}\Microsoft Visual Studio\Installer\vswhere.exe"
$vs = & $vswhere -latest -products * -requires Microsoft.VisualStudio.Component.VC.Tools.x86.x64 -property installationPath
if (-not $vs) { throw "no Visual Studio with the x64 C++ toolset found" }
$vcvars = Join-Path $vs "VC\Auxiliary\Build\vcvars64.bat"
$lines = cmd /c "`"$vcvars`" -vcvars_ver=$VcvarsVer > nul && set"
if ($LASTEXITCODE -ne 0) { throw "$vcvars failed" }
foreach ($line in $lines) {
  if ($line -match "^(PATH|INCLUDE|LIB|LIBPATH|VCINSTALLDIR|VCToolsInstallDir|VCToolsVersion|WindowsSdkDir|WindowsSDKVersion|UCRTVersion|UniversalCRTSdkDir|VSINSTALLDIR)=(.*)$") {
    "$($Matches[1])=$($Matches[2])" | Out-File -FilePath $env:GITHUB_ENV -Append -Encoding utf8
  }
}
"CMAKE_GENERATOR=Ninja" | Out-File -FilePath $env:GITHUB_ENV -Append -Encoding utf8
$tools = ($lines | Where-Object { $_ -match "^VCToolsVersion=" }) -replace "^VCToolsVersion=", ""
if (-not $tools.StartsWith($VcvarsVer)) { throw "MSVC toolset $tools, expected $VcvarsVer" }
Write-Host "MSVC $VcvarsVer environment exported from $vcvars"
